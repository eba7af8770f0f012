"""The watchdog: ends a worker whose lab is gone, wherever the worker is blocked.

    python -I -S watchdog.py WORKER_PID LAB_PID EVENTS_FILE SWAP_DIR|- T0 RANK|-

The worker starts this small process first thing (standard library only, no
site-packages: it costs a few MiB and no imports of note). It sleeps on two
pidfds, the worker's and the lab's (the process that follows the run: a
notebook kernel, the CLI, a test). When the worker ends, so does the watchdog.
When the lab ends first, the worker is asked to stop (SIGTERM: it stops at
once and reports `stopped`); if it has not ended within GRACE_SECONDS (a
thread stuck in native code, a hung collective), the watchdog kills its whole
process group, writes the `run_end` the worker could not write, and removes the
run's swap folder if memlab created it (marker file). The watchdog is in the
worker's process group, so the lab's own clean-up reaches it too.
"""
import json
import os
import select
import shutil
import signal
import sys
import time

GRACE_SECONDS = 5.0
# Must equal memlab.protocol.SWAP_MARKER (tests/unit/test_protocol.py checks it): this file imports nothing
# of memlab's, as it runs with `python -I -S`, so it spells the name itself.
SWAP_MARKER = ".memlab-swap"


POLL_SECONDS = 0.2  # only where the kernel has no pidfds (gVisor, Linux before 5.3)


def ended(pid):
    """Has `pid` exited? A zombie has: it is only waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except OSError:
        return True


def wait_for_exit(pids, timeout=None):
    """Block until one of `pids` has exited (or `timeout` seconds passed); the
    set of those that have. Sleeps on pidfds, which the kernel wakes on exit."""
    done = {pid for pid in pids if ended(pid)}
    if done:
        return done
    try:
        fds = {os.pidfd_open(pid): pid for pid in pids}
    except ProcessLookupError:
        return {pid for pid in pids if ended(pid)}
    except OSError:  # no pidfds here: look every POLL_SECONDS
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done and (deadline is None or time.monotonic() < deadline):
            time.sleep(POLL_SECONDS)
            done = {pid for pid in pids if ended(pid)}
        return done
    try:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        return {fds[fd] for fd, _ in poller.poll(None if timeout is None else int(timeout * 1000))}
    finally:
        for fd in fds:
            os.close(fd)


def append_run_end(events_file, t0, rank, error):
    event = {"t": round(time.monotonic() - t0, 4), "kind": "run_end", "status": "stopped", "error": error,
             "summary": None}
    if rank is not None:
        event["rank"] = rank
    try:
        with open(events_file, "a") as f:
            # a line the killed worker left torn must not swallow this one
            f.write("\n" + json.dumps(event, separators=(",", ":")) + "\n")
    except OSError:
        pass


def last_phase(events_file):
    """(name, step) of the last phase event the worker wrote."""
    name, step = "start", 0
    try:
        with open(events_file) as f:
            for line in f:
                if '"kind":"phase"' in line:
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    name, step = event.get("name", name), event.get("step", step)
    except OSError:
        pass
    return name, step


def remove_swap_folder(path):
    """memlab.protocol.remove_swap_folder, which this file cannot import: remove a
    run's swap folder, only if memlab created it (marker file), the marker last
    (the reasons are there)."""
    if not path or not os.path.isfile(os.path.join(path, SWAP_MARKER)):
        return
    try:
        names = [n for n in os.listdir(path) if n != SWAP_MARKER]
    except OSError:
        return
    for name in names:
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                os.unlink(entry)
            except OSError:
                pass
    try:
        if any(n != SWAP_MARKER for n in os.listdir(path)):
            return  # something is still writing here: keep the claim
        os.unlink(os.path.join(path, SWAP_MARKER))
        os.rmdir(path)
    except OSError:
        pass  # another remover got there first


def main(argv):
    worker_pid, lab_pid, events_file, swap_dir, t0, rank = argv
    worker_pid, lab_pid, t0 = int(worker_pid), int(lab_pid), float(t0)
    swap_dir = None if swap_dir == "-" else swap_dir
    rank = None if rank == "-" else int(rank)
    # The lab's Stop signals the whole process group: the watchdog must outlive
    # the worker it watches (the lab's SIGKILL of the group ends it at last).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if worker_pid in wait_for_exit([worker_pid, lab_pid]):
        return 0  # the worker ended while its lab lived: the lab cleans up
    try:
        os.kill(worker_pid, signal.SIGTERM)  # the lab is gone: nobody follows this run any more
    except ProcessLookupError:
        return 0
    if wait_for_exit([worker_pid], GRACE_SECONDS):
        if rank in (None, 0):
            remove_swap_folder(swap_dir)  # the worker removes it too; nobody else is left to
        return 0  # it stopped itself and reported why
    phase, step = last_phase(events_file)
    os.kill(worker_pid, signal.SIGKILL)
    wait_for_exit([worker_pid], GRACE_SECONDS)
    append_run_end(events_file, t0, rank,
                   f"the parent process ended (kernel restarted or interrupted) at step {step} ({phase}); "
                   f"the worker did not stop within {GRACE_SECONDS:.0f} s and was killed")
    if rank in (None, 0):
        remove_swap_folder(swap_dir)
    try:
        os.killpg(os.getpgid(0), signal.SIGKILL)  # anything the worker started, this process last
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The run protocol: the files a run is made of, shared by the lab (the
parent), the worker and the run store. Standard library only.

A run folder `<store>/<run_id>/` holds
- `request.json`: what to run, written by the lab before the worker starts;
- `events.jsonl` (rank 0, or the only rank) and `events.rank<r>.jsonl` (rank
  r > 0): the events each worker appends, one JSON object a line
  (memlab.telemetry);
- `worker.log`: the worker's stdout and stderr;
- `summary.json`: written by the lab once the run has ended (memlab.summary).

A run that swaps to NVMe has a swap folder of its own, `<swap root>/<run_id>/`,
carrying SWAP_MARKER ("<pid of the lab> <run_id>"). memlab deletes only
folders that carry it, so it never removes what it did not create.
memlab.engine.watchdog, which runs without memlab on its path, spells the
same marker name itself (a test keeps the two equal).
"""
import os
import re
import shutil

REQUEST_FILE = "request.json"
EVENTS_FILE = "events.jsonl"  # rank 0 (and single-rank runs); rank r > 0 writes events.rank<r>.jsonl
SUMMARY_FILE = "summary.json"
WORKER_LOG = "worker.log"
SWAP_MARKER = ".memlab-swap"  # in each run's swap folder: memlab removes only folders that carry it
# a swap folder's file system with less free space than this after a failed run was full
NO_SPACE_BYTES = 2 << 20


def alive(pid):
    """Does process `pid` still run? A zombie does not: it has exited and only
    waits for its parent to reap it (a lab killed a moment ago is one), so a
    plain kill(pid, 0), which succeeds on a zombie, would call it alive."""
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError, ValueError):
        return False
    return state != "Z"


def events_file(rank):
    """The events file name of one rank."""
    return EVENTS_FILE if rank == 0 else f"events.rank{rank}.jsonl"


def rank_files(path):
    """rank -> events file of every rank present in a run folder."""
    found = {}
    for name in os.listdir(path):
        match = re.fullmatch(r"events(?:\.rank(\d+))?\.jsonl", name)
        if match:
            found[int(match.group(1) or 0)] = os.path.join(path, name)
    return dict(sorted(found.items()))


# names memlab gives what it is making in a swap root (a run folder before its marker, the O_DIRECT
# probe): another lab sharing the root skips them instead of calling them foreign
IN_FLIGHT_PREFIX = ".memlab-"


def make_swap_folder(root, run_id):
    """A run's swap folder in `root`, appearing with its marker already in it: made under an
    in-flight name, claimed, then renamed (two labs may share a root)."""
    staging = os.path.join(root, f"{IN_FLIGHT_PREFIX}new-{run_id}")
    os.makedirs(staging)
    mark_swap_folder(staging, run_id)
    path = os.path.join(root, run_id)
    os.rename(staging, path)
    return path


def mark_swap_folder(path, run_id):
    """Claim a swap folder memlab has just made, for this process's run."""
    with open(os.path.join(path, SWAP_MARKER), "w") as f:
        f.write(f"{os.getpid()} {run_id}\n")  # who follows this run: its folder is orphaned once it is gone


def swap_folder_owner(path):
    """The pid of the lab that follows the run of this swap folder (OSError,
    ValueError or IndexError where it has no readable marker)."""
    with open(os.path.join(path, SWAP_MARKER)) as f:
        return int(f.read().split()[0])


def remove_swap_folder(path):
    """Remove a run's swap folder, only if memlab created it (marker file). The
    marker goes last: the worker, its watchdog and the lab each remove the folder
    as they end, and one of them may be killed mid-way (the lab ends the run's
    process group); a removal cut short leaves the folder still marked, for the
    next to finish, never an unmarked folder that blocks the swap root."""
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


def no_space_left(path):
    """Is the file system of this swap folder (nearly) full?"""
    if not path or not os.path.isdir(path):
        return False
    return shutil.disk_usage(path).free < NO_SPACE_BYTES

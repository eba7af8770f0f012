"""Stop always stops: wherever the worker is blocked (waiting on another
process's op build, inside DeepSpeed's engine init, in a step), Stop, Ctrl-C,
SIGTERM and the death of the lab end it with status `stopped`, its swap folder
removed and no process left. Each test waits for the event that puts the worker
where it means to stop it (a held op-build lock, a phase event), never for a
guessed time."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from helpers import has_event, has_log, processes_of, wait_for

from memlab import Lab
from memlab.oplocks import extensions_root

pytestmark = pytest.mark.engine

WAITING = "waiting for a DeepSpeed op build in another process"


@pytest.fixture
def held_op_lock(tmp_path, monkeypatch):
    """hold(op): the built ops in a folder of the test's own, with `op`'s build
    lock held by a live "build" (a process working in its folder), so a worker
    that loads `op` waits on it; the environment points runs there."""
    root = tmp_path / "torch_extensions"
    shutil.copytree(extensions_root(), root, symlinks=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    builders = []

    def hold(op):
        builder = subprocess.Popen(["sleep", "3600"], cwd=root / op)
        builders.append(builder)
        (root / op / "lock").write_text("")
        return root / op / "lock"

    yield hold
    for builder in builders:
        builder.kill()
        builder.wait()


def assert_stopped_clean(run, swap, where):
    summary = run.summary
    assert summary["status"] == "stopped", summary["error"]
    assert "stopped by the user" in summary["error"] and where in summary["error"], summary["error"]
    assert wait_for(lambda: not processes_of(run.path)), "a process of the run outlived it"
    assert os.listdir(swap) == []


def test_stop_while_waiting_on_an_op_build_lock(tmp_path, swap, held_op_lock):
    lock = held_op_lock("async_io")
    run = Lab(tmp_path / "store").run({"run.steps": 1, "run.swap_dir": str(swap)})
    assert wait_for(lambda: has_log(run.path, f"{WAITING} (lock {lock})")), "the worker never reached the lock"
    run.stop()
    assert_stopped_clean(run, swap, "at step 0 (import)")
    assert lock.exists()  # not memlab's to remove


def test_stop_inside_deepspeed_engine_init(tmp_path, swap, held_op_lock):
    # CPU Adam's op is first loaded inside deepspeed.initialize (the optimizer):
    # with its lock held, the worker is inside engine init until stopped.
    lock = held_op_lock("cpu_adam")
    run = Lab(tmp_path / "store").run({"run.steps": 1, "run.swap_dir": str(swap)})
    assert wait_for(lambda: has_log(run.path, f"{WAITING} (lock {lock})"))
    assert has_event(run.path, "phase", name="engine_init")
    run.stop()
    assert_stopped_clean(run, swap, "at step 0 (engine_init)")


def test_stop_during_a_step(tmp_path, swap):
    run = Lab(tmp_path / "store").run({"run.steps": 400, "run.swap_dir": str(swap)})
    assert wait_for(lambda: has_event(run.path, "phase", name="backward", step=2))
    run.stop()
    assert_stopped_clean(run, swap, "at step ")
    assert any(f"({phase})" in run.summary["error"] for phase in ("forward", "backward", "optimizer_step"))


def test_lab_killed_while_its_worker_waits_on_a_held_lock(tmp_path, swap, held_op_lock):
    """The notebook kernel dies (SIGKILL) while its worker waits on a lock that
    stays held: the worker must not outlive it, and its swap folder goes."""
    lock = held_op_lock("async_io")
    store = tmp_path / "orphan-store"
    script = textwrap.dedent(f"""
        import sys, time
        import memlab
        run = memlab.Lab({str(store)!r}).run({{"run.steps": 1, "run.swap_dir": {str(swap)!r}}})
        print(run.path, flush=True)
        time.sleep(3600)  # the kernel idles; the test kills it
    """)
    lab = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    run_dir = lab.stdout.readline().strip()
    assert run_dir, "the lab did not start a run"
    assert wait_for(lambda: has_log(run_dir, f"{WAITING} (lock {lock})"))
    assert os.listdir(swap) != []
    lab.kill()
    lab.wait()
    assert wait_for(lambda: not processes_of(run_dir), timeout=10), "the worker outlived its lab by 10 s"
    assert wait_for(lambda: os.listdir(swap) == [], timeout=10), "the orphaned worker left its swap folder"
    from memlab import load_run

    summary = load_run(run_dir).summary  # no summary.json: rebuilt from the events the worker wrote
    assert summary["status"] == "stopped" and "the parent process ended" in summary["error"]


def test_lab_killed_while_its_worker_is_stuck_in_native_code(tmp_path, swap):
    """A worker that never returns to Python (here: SIGSTOPped, the harshest
    case of a thread stuck in native code) cannot stop itself when its lab
    dies: the watchdog kills it after its grace, says so in the events, and
    removes the swap folder."""
    store = tmp_path / "store"
    script = textwrap.dedent(f"""
        import time
        import memlab
        run = memlab.Lab({str(store)!r}).run({{"run.steps": 400, "run.swap_dir": {str(swap)!r}}})
        print(run.path, run._process.pid, flush=True)
        time.sleep(3600)
    """)
    lab = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    run_dir, worker = lab.stdout.readline().split()
    assert wait_for(lambda: has_event(run_dir, "step", index=1))
    os.kill(int(worker), signal.SIGSTOP)
    lab.kill()
    lab.wait()
    assert wait_for(lambda: not processes_of(run_dir), timeout=30), "the stuck worker outlived its lab"
    assert wait_for(lambda: os.listdir(swap) == [], timeout=10)
    (end,) = [e for e in open_events(run_dir) if e["kind"] == "run_end"]
    assert end["status"] == "stopped" and "did not stop within" in end["error"]


def open_events(run_dir):
    with open(os.path.join(run_dir, "events.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip().startswith("{") and line.strip().endswith("}")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_signalled_stops_the_run_even_with_sigint_ignored(tmp_path, swap, sig):
    """Ctrl-C (SIGINT) or SIGTERM to `memlab run`. It is started with SIGINT
    ignored, as a shell's background job is (a CI script run with `&`): the CLI
    installs its own handlers, so the signal still stops the run."""
    store = tmp_path / "cli-store"
    cli = subprocess.Popen([sys.executable, "-m", "memlab.cli", "run", "--steps", "400", "--out", str(store),
                            "--set", f"run.swap_dir={swap}"], stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    first = ""
    while not first.startswith("memlab: run "):  # "memlab: run ID in PATH"
        first = cli.stderr.readline()
        assert first, "the CLI ended before starting a run"
    run_dir = first.rsplit(" in ", 1)[1].strip()
    assert wait_for(lambda: has_event(run_dir, "step", index=1))
    cli.send_signal(sig)
    cli.communicate()
    assert cli.returncode == 1
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "stopped" and "stopped by the user" in summary["error"]
    assert wait_for(lambda: not processes_of(run_dir)) and os.listdir(swap) == []

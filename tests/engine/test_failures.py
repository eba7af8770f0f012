"""Failures done for real: a worker killed mid-step, a DeepSpeed assert, a Python
exception, the parent interrupted or killed, a memory budget, a full disk, two
labs at once, a stale op-build lock. Each run ends with a clear status and
cause, leaves no process and no swap file behind, and earlier runs stay readable."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest
from helpers import PATIENCE, has_log, wait_for

from memlab import KnobError, Lab, load_run
from memlab import components as C
from memlab.oplocks import StaleOpLock

pytestmark = pytest.mark.engine


def has_step(run_dir):
    try:
        with open(os.path.join(run_dir, "events.jsonl")) as f:
            return '"kind":"step"' in f.read()
    except FileNotFoundError:
        return False


def workers_of(run_dir):
    return [p for p in psutil.process_iter(["cmdline"]) if run_dir in " ".join(p.info["cmdline"] or [])]


@pytest.fixture
def earlier(lab, swap):
    """A finished run that every failure below must leave readable."""
    run = lab.run({"run.steps": 1, "run.swap_dir": str(swap)}, wait=True)
    assert run.summary["status"] == "ok"
    return run


def assert_clean(run, swap, earlier):
    assert not workers_of(run.path), "a worker process outlived its run"
    assert os.listdir(swap) == [], "swap files were left behind"
    assert load_run(earlier.path) == earlier
    assert load_run(run.path).summary == run.summary


def test_worker_killed_mid_step(lab, swap, earlier):
    run = lab.run({"run.steps": 400, "run.swap_dir": str(swap)})
    assert wait_for(lambda: len(run.steps) >= 1)
    os.kill(run._process.pid, signal.SIGKILL)
    summary = run.wait(60)
    assert summary["status"] == "failed"
    assert summary["error"].startswith("worker killed by SIGKILL")
    assert "last phase" in summary["error"] and "step" in summary["error"]
    assert_clean(run, swap, earlier)


def test_deepspeed_assert_is_reported_with_its_traceback(lab, swap, earlier):
    # A risk memlab warns about and runs (reuse distance > 0 with fewer buffers than
    # small-llama's 30 swapped tensors): at 1e9 every parameter is kept and DeepSpeed
    # asserts at step 2 (at 1e7 it trains: tests/engine/test_traps.py).
    with pytest.warns(UserWarning, match="stage3_max_reuse_distance=1000000000: above 0"):
        run = lab.run({"run.steps": 3, "run.swap_dir": str(swap),
                       "zero_optimization.stage3_max_reuse_distance": 10**9}, model="small-llama", wait=True)
    assert run.summary["status"] == "failed"
    assert "AssertionError" in run.summary["error"] and "Not enough buffers" in run.summary["error"]
    assert "(phase forward, step 2); memlab warned: zero_optimization.stage3_max_reuse_distance" in run.summary["error"]
    (error,) = [e for e in run.events if e["kind"] == "error"]
    assert any("partitioned_param_swapper.py" in line for line in error["traceback"])
    assert_clean(run, swap, earlier)


def test_python_exception_in_the_worker(lab, swap, earlier, monkeypatch):
    # A token id outside the vocabulary, past validation: the embedding raises.
    monkeypatch.setattr("memlab.lab._check_data", lambda data, spec: None)
    run = lab.run({"run.steps": 2, "run.swap_dir": str(swap)}, data=[[10**9, 1, 2, 3]], wait=True)
    assert run.summary["status"] == "failed"
    assert "IndexError" in run.summary["error"] and "phase forward, step 1" in run.summary["error"]
    assert_clean(run, swap, earlier)


def test_parent_killed_worker_ends_and_cleans_up(tmp_path, swap):
    # A notebook kernel killed or restarted: its worker must not outlive it.
    store = tmp_path / "orphan-store"
    script = textwrap.dedent(f"""
        import memlab, time
        run = memlab.Lab({str(store)!r}).run({{"run.steps": 400, "run.swap_dir": {str(swap)!r}}})
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script])
    assert wait_for(lambda: store.exists() and os.listdir(store))
    run_dir = str(store / os.listdir(store)[0])
    assert wait_for(lambda: has_step(run_dir))
    parent.kill()
    # Not reaped until the worker is gone: a killed kernel stays a zombie until
    # its own parent waits for it, and the worker must see it as gone already.
    assert wait_for(lambda: not workers_of(run_dir)), "the worker outlived its parent"
    assert wait_for(lambda: os.listdir(swap) == []), "the orphaned worker left its swap folder"
    parent.wait()
    run = load_run(run_dir)  # no summary.json: rebuilt from the events the worker wrote
    assert run.summary["status"] == "stopped"
    assert "the parent process ended" in run.summary["error"]


def test_budget_ends_the_run_over_budget_and_names_the_growth(lab, swap, earlier):
    # tiny-llama peaks near 730 MiB; 560 MiB is passed while the engine sets up.
    run = lab.run({"run.steps": 3, "run.swap_dir": str(swap), "run.budget": "560MiB"}, wait=True)
    summary = run.summary
    assert summary["status"] == "over_budget"
    assert summary["error"].startswith("over the 560.0 MiB budget at step")
    assert "growing: " in summary["error"]
    grown = summary["error"].split("growing: ")[1].split(" ")[0].rstrip(",")
    assert grown in C.ALL
    assert_clean(run, swap, earlier)
    # the lab carries on: the next run, without a budget, finishes
    assert lab.run({"run.steps": 1, "run.swap_dir": str(swap)}, wait=True).summary["status"] == "ok"


def fill(path):
    """Write zeros until the file system is full (ENOSPC)."""
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass


@pytest.fixture
def small_disk(tmp_path):
    """A 160 MiB tmpfs (O_DIRECT works on it) as the swap root; needs root to mount."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160m", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_a_swap_dir_too_small_is_refused_before_starting(lab, small_disk):
    with pytest.raises(KnobError, match="MiB free; this run swaps about"):
        lab.run({"run.swap_dir": str(small_disk)}, model="small-llama")  # about 900 MiB of swap files


def test_disk_full_during_the_run_fails_with_no_space_left(lab, small_disk, earlier):
    root = small_disk / "swap"
    root.mkdir()
    run = lab.run({"run.steps": 400, "run.swap_dir": str(root)})  # tiny-llama swaps about 104 MiB
    # Another program fills the disk while the worker starts, before the swap
    # files exist (once written, DeepSpeed rewrites them in place: no new space).
    fill(small_disk / "filler")
    summary = run.wait(300)
    assert summary is not None, "the run hung on a full disk"
    assert summary["status"] == "failed"
    assert summary["error"].startswith(f"no space left on {root}")
    assert not workers_of(run.path) and os.listdir(root) == []
    assert os.path.exists(small_disk / "filler")  # not memlab's: left alone
    assert load_run(earlier.path) == earlier


def test_two_labs_at_once_do_not_collide(tmp_path, swap):
    first, second = Lab(tmp_path / "a"), Lab(tmp_path / "b")
    runs = [first.run({"run.steps": 2, "run.swap_dir": str(swap)}),
            second.run({"run.steps": 2, "run.swap_dir": str(swap)})]
    summaries = [run.wait(600) for run in runs]
    assert [s["status"] for s in summaries] == ["ok", "ok"], [s["error"] for s in summaries]
    assert runs[0].run_id != runs[1].run_id and runs[0].path != runs[1].path
    swap_paths = [json.load(open(os.path.join(r.path, "request.json")))["swap_path"] for r in runs]
    assert swap_paths[0] != swap_paths[1]
    assert os.listdir(swap) == []


def test_a_killed_writer_leaves_a_store_that_still_loads(lab, swap):
    run = lab.run({"run.steps": 400, "run.swap_dir": str(swap)})
    assert wait_for(lambda: len(run.steps) >= 1)
    os.kill(run._process.pid, signal.SIGKILL)
    run.wait(60)
    events = os.path.join(run.path, "events.jsonl")
    with open(events, "a") as f:
        f.write('{"t": 1.0, "kind": "sam')  # a line torn in the middle, as a crash leaves it
    os.remove(os.path.join(run.path, "summary.json"))
    with pytest.warns(UserWarning, match="incomplete line"):
        loaded = load_run(run.path)
    assert loaded.events == run.events and loaded.summary["status"] == "failed"


def test_a_stale_op_build_lock_is_named_with_the_fix(tmp_path, monkeypatch):
    root = tmp_path / "torch_extensions"
    (root / "py311_cpu" / "async_io").mkdir(parents=True)
    lock = root / "py311_cpu" / "async_io" / "lock"
    lock.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    with pytest.raises(StaleOpLock) as info:
        Lab(tmp_path / "store").plan()
    assert f"rm {lock}" in str(info.value)
    assert lock.exists()  # memlab did not create it: it says what to do, it does not delete it
    # the same lock held by a live build (a process working in that folder) is not stale
    builder = subprocess.Popen(["sleep", "30"], cwd=lock.parent)
    try:
        assert wait_for(lambda: os.path.realpath(f"/proc/{builder.pid}/cwd") == str(lock.parent))
        Lab(tmp_path / "store").plan()
    finally:
        builder.kill()


def test_a_lock_that_goes_stale_while_the_worker_waits(tmp_path, swap, monkeypatch):
    # A build killed midway while a run waits on its lock: torch would wait forever.
    root = tmp_path / "torch_extensions"
    import shutil

    from memlab.oplocks import extensions_root

    shutil.copytree(extensions_root(), root, symlinks=True)  # the built ops, in a folder of the test's own
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    builder = subprocess.Popen(["sleep", "600"], cwd=root / "async_io")  # "a build in progress"
    (root / "async_io" / "lock").write_text("")
    try:
        run = Lab(tmp_path / "store").run({"run.steps": 1, "run.swap_dir": str(swap)})
        # the worker reports that it waits on that build's lock
        assert wait_for(lambda: has_log(run.path, "waiting for a DeepSpeed op build in another process"))
        builder.kill()  # the build dies; its lock stays
        builder.wait()
        summary = run.wait(PATIENCE)
    finally:
        builder.kill()
    assert summary is not None, "the worker waited forever on a stale lock"
    assert summary["status"] == "failed"
    assert "a DeepSpeed op build was killed midway" in summary["error"] and "rm " in summary["error"]
    assert (root / "async_io" / "lock").exists()
    assert os.listdir(swap) == []

"""The notebooks run: each one executes headless (nbclient) top to bottom at its
default sizes, stores the widgets' state with real data, and stays within
Binder's memory. Their pairing and Binder's files: tests/unit/test_notebooks.py.

Memory, exactly what is measured:
- `sampled`: every 0.1 s, the PSS (proportional set size, /proc/PID/smaps_rollup)
  of the kernel process plus every process under it (the run workers and
  anything they start), summed; the maximum. PSS, not RSS: a worker's forks
  share its pages, which an RSS sum would count twice (the RSS sum is reported
  beside it).
- `bound`: the kernel's own high-water mark (VmHWM from /proc, read after the
  last cell ran) plus the largest worker high-water mark of the notebook's runs
  (each run's `peak_rss_bytes`, the worker's VmHWM). The sampler also checks
  that at most one worker lives at a time, so kernel + worker together never
  exceeded this bound. (Short-lived helpers a worker starts while DeepSpeed
  initialises, its gcc and cpuinfo probes, are in the sampled figure only.)
Both must stay under 1.8 GB (Binder restarts a kernel above 2 GB).
"""
import concurrent.futures
import glob
import json
import os
import shutil
import threading
import time

import pytest
from helpers import NOTEBOOKS, notebook_names

BUDGET = int(1.8e9)
TIMEOUT = 900  # per cell; a notebook takes a few minutes here


class TreeSampler(threading.Thread):
    """Max over time of RSS(kernel + all its descendants), and the most workers at once."""

    def __init__(self, client, interval=0.1):
        super().__init__(daemon=True)
        self.client, self.interval = client, interval
        self.peak = 0  # RSS summed: pages a fork shares with its parent count twice
        self.peak_pss = 0  # PSS summed: shared pages split between their users, so the sum is the real total
        self.most_workers = 0
        self.kernel_pid = None
        self._halt = threading.Event()

    def run(self):
        import psutil

        while not self._halt.is_set():
            km = getattr(self.client, "km", None)
            pid = getattr(getattr(km, "provisioner", None), "pid", None) if km is not None else None
            if pid:
                self.kernel_pid = pid
                try:
                    kernel = psutil.Process(pid)
                    procs = [kernel] + kernel.children(recursive=True)
                    total = pss = 0
                    worker_pids = {}
                    for p in procs:
                        try:
                            total += p.memory_info().rss
                            pss += p.memory_full_info().pss
                            if "memlab.engine.worker" in " ".join(p.cmdline()):
                                worker_pids[p.pid] = p.ppid()
                        except psutil.Error:
                            pass
                    # a worker's own forks (DeepSpeed's cpuinfo probe) share its command line: count roots
                    workers = sum(1 for ppid in worker_pids.values() if ppid not in worker_pids)
                    self.peak = max(self.peak, total)
                    self.peak_pss = max(self.peak_pss, pss)
                    self.most_workers = max(self.most_workers, workers)
                except psutil.Error:
                    pass
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join(5)


def vm_hwm(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def figure_states(nb):
    """(model id, state) of every plotly FigureWidget in the stored widget state."""
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    return [(k, v["state"]) for k, v in state.items() if "_widget_data" in v.get("state", {})]


def points(trace):
    x = trace.get("x") or trace.get("z") or []
    return len(x)


def execute(name, tmp_path):
    """Run one notebook headless with its kernel tree sampled: (the executed notebook, its sampler,
    the kernel's VmHWM after its last cell, seconds)."""
    import nbclient
    import nbformat

    workdir = tmp_path / "notebooks"
    workdir.mkdir(parents=True)
    shutil.copy(os.path.join(NOTEBOOKS, name + ".ipynb"), workdir)
    nb = nbformat.read(workdir / (name + ".ipynb"), as_version=4)
    kernel_hwm = {}

    def after_cell(cell, cell_index, execute_reply):
        kernel_hwm["bytes"] = vm_hwm(client.km.provisioner.pid)  # kernel alive: read it after every cell

    client = nbclient.NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", store_widget_state=True,
                                     resources={"metadata": {"path": str(workdir)}},
                                     on_cell_executed=after_cell)
    sampler = TreeSampler(client)
    sampler.start()
    started = time.monotonic()
    try:
        client.execute()
    finally:
        sampler.stop()
    elapsed = time.monotonic() - started
    nbformat.write(nb, tmp_path / (name + ".executed.ipynb"))
    return nb, sampler, kernel_hwm.get("bytes", 0), elapsed


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Every notebook, two at a time: each has its own kernel, whose process tree is sampled on its own
    (and a notebook's runs are one at a time), so its memory figures do not depend on its neighbour."""
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    names = notebook_names()
    folders = {name: tmp_path_factory.mktemp(name) for name in names}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(execute, name, folders[name]) for name in names}
        concurrent.futures.wait(futures.values())
    # a notebook that failed fails its own test (with its own error), not its neighbours'
    return {name: (folders[name], future.exception() or future.result()) for name, future in futures.items()}


@pytest.mark.engine
@pytest.mark.parametrize("name", notebook_names())
def test_notebook_runs_headless_with_data_and_within_binder_memory(name, executed):
    tmp_path, result = executed[name]
    if isinstance(result, BaseException):
        raise result
    nb, sampler, kernel_vm_hwm, elapsed = result
    workdir = tmp_path / "notebooks"
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors

    # runs: in the notebook's own store, each one finished
    summaries = []
    for path in sorted(glob.glob(str(workdir / "memlab-runs" / "*" / "summary.json"))):
        with open(path) as f:
            summaries.append(json.load(f))
    assert summaries, "the notebook made no run"
    assert all(s["status"] == "ok" for s in summaries), [(s["run_id"], s["status"], s["error"]) for s in summaries]

    # widget state stored, with real data in the traces
    figures = figure_states(nb)
    assert figures, "no FigureWidget state stored"
    with_points = [k for k, st in figures if any(points(t) > 1 for t in st["_widget_data"])]
    assert with_points, "stored figures have no points"
    live = [st for _, st in figures if any(t.get("name") == "framework" for t in st["_widget_data"])
            and any(t.get("name") == "pool fill" for t in st["_widget_data"])]
    assert live, "the dashboard's live chart is not stored"
    rss = [t for st in live for t in st["_widget_data"] if t.get("name") == "rss"]
    assert max(len(t.get("x") or []) for t in rss) > 10, "the live memory chart has no real data"

    # memory: kernel + workers under Binder's limit
    worker_hwm = max(s["peak_rss_bytes"] for s in summaries)
    bound = kernel_vm_hwm + worker_hwm
    report = (f"{name}: {len(summaries)} runs in {elapsed:.0f} s; sampled kernel+workers peak PSS "
              f"{sampler.peak_pss / 2**20:.0f} MiB (RSS sum {sampler.peak / 2**20:.0f} MiB); "
              f"kernel VmHWM {kernel_vm_hwm / 2**20:.0f} MiB + worst worker "
              f"VmHWM {worker_hwm / 2**20:.0f} MiB = {bound / 2**20:.0f} MiB")
    print(report)
    assert sampler.most_workers <= 1, "runs overlapped: the bound below would not hold"
    assert 0 < sampler.peak_pss < BUDGET, report
    assert bound < BUDGET, report

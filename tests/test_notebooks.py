"""The notebooks: paired with their plain-text copies, and each one executes
headless (nbclient) top to bottom at its default sizes, stores the widgets'
state with real data, and stays within Binder's memory.

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
import glob
import json
import os
import shutil
import threading
import time

import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
BUDGET = int(1.8e9)
TIMEOUT = 900  # per cell; a notebook takes a few minutes here


def notebook_paths():
    return sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


def names():
    return [os.path.splitext(os.path.basename(p))[0] for p in notebook_paths()]


# ------------------------------------------------------------ jupytext pairs

def test_there_are_notebooks_and_each_has_its_text_copy():
    ipynb = {os.path.splitext(p)[0] for p in notebook_paths()}
    text = {os.path.splitext(p)[0] for p in glob.glob(os.path.join(NOTEBOOKS, "*.py"))}
    assert {"quickstart", "offload_knobs", "memascend", "sizing"} <= {os.path.basename(p) for p in ipynb}
    assert ipynb == text, "every notebook needs its py:percent copy (jupytext --sync notebooks/*.ipynb)"


@pytest.mark.parametrize("name", names())
def test_pair_is_in_sync(name):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(os.path.join(NOTEBOOKS, name + ".ipynb"))
    py = jupytext.read(os.path.join(NOTEBOOKS, name + ".py"), fmt="py:percent")
    cells = lambda n: [(c.cell_type, c.source.strip()) for c in n.cells]  # noqa: E731
    assert cells(nb) == cells(py), f"{name}.ipynb and {name}.py differ: run jupytext --sync notebooks/{name}.ipynb"


@pytest.mark.parametrize("name", names())
def test_committed_notebooks_carry_no_outputs(name):
    with open(os.path.join(NOTEBOOKS, name + ".ipynb")) as f:
        nb = json.load(f)
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", names())
def test_each_notebook_ends_with_a_question(name):
    with open(os.path.join(NOTEBOOKS, name + ".ipynb")) as f:
        nb = json.load(f)
    last = "".join(nb["cells"][-1]["source"])
    assert nb["cells"][-1]["cell_type"] == "markdown" and "Try this" in last and "?" in last


# ----------------------------------------------------------------- execution

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


@pytest.mark.engine
@pytest.mark.parametrize("name", names())
def test_notebook_runs_headless_with_data_and_within_binder_memory(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
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
    bound = kernel_hwm["bytes"] + worker_hwm
    report = (f"{name}: {len(summaries)} runs in {elapsed:.0f} s; sampled kernel+workers peak PSS "
              f"{sampler.peak_pss / 2**20:.0f} MiB (RSS sum {sampler.peak / 2**20:.0f} MiB); kernel VmHWM {kernel_hwm['bytes'] / 2**20:.0f} MiB + worst worker "
              f"VmHWM {worker_hwm / 2**20:.0f} MiB = {bound / 2**20:.0f} MiB")
    print(report)
    assert sampler.most_workers <= 1, "runs overlapped: the bound below would not hold"
    assert 0 < sampler.peak_pss < BUDGET, report
    assert bound < BUDGET, report


# -------------------------------------------------------------------- binder

BINDER = os.path.join(os.path.dirname(NOTEBOOKS), "binder")


def test_binder_pins_the_versions_this_suite_runs_with():
    from importlib.metadata import version

    pins = {}
    with open(os.path.join(BINDER, "requirements.txt")) as f:
        for line in f:
            line = line.split("#")[0].strip()
            if line:
                assert "==" in line and not line.startswith("-"), f"pin every requirement, no pip options: {line}"
                name, pinned = line.split("==")
                pins[name] = pinned
    for required in ("torch", "deepspeed", "transformers", "plotly", "anywidget", "ipywidgets", "ipykernel",
                     "jupyterlab", "psutil", "numpy", "ninja", "accelerate"):
        assert required in pins, required
    for name, pinned in pins.items():
        assert version(name).split("+")[0] == pinned, f"{name}: pinned {pinned}, tested with {version(name)}"


def test_binder_layout():
    with open(os.path.join(BINDER, "runtime.txt")) as f:
        assert f.read().strip() == "python-3.11"
    with open(os.path.join(BINDER, "apt.txt")) as f:
        assert {"libaio-dev", "build-essential"} <= set(f.read().split())
    post = os.path.join(BINDER, "postBuild")
    assert os.access(post, os.X_OK)
    with open(post) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert lines[0] == "set -e"
    assert any(line.startswith("pip install") for line in lines)
    assert "python -m memlab.engine.build_ops" in lines
    with open(os.path.join(os.path.dirname(BINDER), "README.md")) as f:
        assert "?urlpath=lab/tree/notebooks/quickstart.ipynb" in f.read()
    for name in os.listdir(BINDER):  # no package host named in committed files
        with open(os.path.join(BINDER, name)) as f:
            text = f.read()
        assert "download.pytorch" not in text and "index-url" not in text

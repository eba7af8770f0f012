"""The notebooks: each paired with its plain-text copy, committed without
outputs, ending with a question; Binder's files pin what this suite runs with.
Each notebook executed headless within Binder's memory:
tests/engine/test_notebooks_runs.py."""
import glob
import json
import os

import pytest
from helpers import NOTEBOOKS, ROOT, notebook_names, notebook_paths

BINDER = os.path.join(ROOT, "binder")


# ------------------------------------------------------------ jupytext pairs

def test_there_are_notebooks_and_each_has_its_text_copy():
    ipynb = {os.path.splitext(p)[0] for p in notebook_paths()}
    text = {os.path.splitext(p)[0] for p in glob.glob(os.path.join(NOTEBOOKS, "*.py"))}
    assert {"quickstart", "offload_knobs", "memascend", "sizing"} <= {os.path.basename(p) for p in ipynb}
    assert ipynb == text, "every notebook needs its py:percent copy (jupytext --sync notebooks/*.ipynb)"


@pytest.mark.parametrize("name", notebook_names())
def test_pair_is_in_sync(name):
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(os.path.join(NOTEBOOKS, name + ".ipynb"))
    py = jupytext.read(os.path.join(NOTEBOOKS, name + ".py"), fmt="py:percent")
    cells = lambda n: [(c.cell_type, c.source.strip()) for c in n.cells]  # noqa: E731
    assert cells(nb) == cells(py), f"{name}.ipynb and {name}.py differ: run jupytext --sync notebooks/{name}.ipynb"


@pytest.mark.parametrize("name", notebook_names())
def test_committed_notebooks_carry_no_outputs(name):
    with open(os.path.join(NOTEBOOKS, name + ".ipynb")) as f:
        nb = json.load(f)
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("name", notebook_names())
def test_each_notebook_ends_with_a_question(name):
    with open(os.path.join(NOTEBOOKS, name + ".ipynb")) as f:
        nb = json.load(f)
    last = "".join(nb["cells"][-1]["source"])
    assert nb["cells"][-1]["cell_type"] == "markdown" and "Try this" in last and "?" in last


# -------------------------------------------------------------------- binder

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
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "?urlpath=lab/tree/notebooks/quickstart.ipynb" in f.read()
    for name in os.listdir(BINDER):  # no package host named in committed files
        with open(os.path.join(BINDER, name)) as f:
            text = f.read()
        assert "download.pytorch" not in text and "index-url" not in text

"""The run protocol (memlab.protocol) and who imports whom around it."""
import ast
import os
import pathlib

import pytest

import memlab
from memlab import protocol
from memlab.engine import watchdog

PACKAGE = pathlib.Path(memlab.__file__).parent


def test_the_watchdog_spells_the_same_swap_marker():
    # the watchdog runs with `python -I -S` and imports nothing of memlab's
    assert watchdog.SWAP_MARKER == protocol.SWAP_MARKER


def test_a_swap_folder_is_removed_only_when_memlab_marked_it(tmp_path):
    foreign, ours = tmp_path / "foreign", tmp_path / "ours"
    foreign.mkdir()
    ours.mkdir()
    (ours / "x.swp").write_bytes(b"0")
    protocol.mark_swap_folder(ours, "run-1")
    assert protocol.swap_folder_owner(ours) == os.getpid()
    with pytest.raises(OSError):
        protocol.swap_folder_owner(foreign)
    protocol.remove_swap_folder(foreign)
    protocol.remove_swap_folder(ours)
    protocol.remove_swap_folder(None)
    assert foreign.exists() and not ours.exists()


@pytest.mark.parametrize("remover", [protocol, watchdog], ids=["lab-and-worker", "watchdog"])
def test_a_removal_cut_short_leaves_the_folder_marked_for_the_next(tmp_path, monkeypatch, remover):
    """The worker, its watchdog and the lab each remove the swap folder; one may be killed
    mid-way. The marker goes last, so an unfinished removal never leaves an unmarked folder
    (which would make the shared swap root look foreign to every later run)."""
    ours = tmp_path / "ours"
    (ours / "zero_stage_3" / "optimizer").mkdir(parents=True)
    (ours / "zero_stage_3" / "optimizer" / "exp_avg-0_0.tensor.swp").write_bytes(b"0")
    (ours / "region.swp").write_bytes(b"0")
    protocol.mark_swap_folder(ours, "run-1")
    with monkeypatch.context() as m:
        m.setattr(remover.shutil, "rmtree", lambda path, ignore_errors=False: None)  # cut short here
        remover.remove_swap_folder(ours)
    assert (ours / protocol.SWAP_MARKER).is_file() and (ours / "zero_stage_3").is_dir()
    assert not (ours / "region.swp").exists()
    remover.remove_swap_folder(ours)  # the next remover finishes
    assert not ours.exists()


def test_no_space_left_only_on_a_folder_that_exists(tmp_path):
    assert protocol.no_space_left(None) is False
    assert protocol.no_space_left(tmp_path / "missing") is False
    assert protocol.no_space_left(tmp_path) is False  # this machine's tmp is not full


def test_events_files_per_rank(tmp_path):
    assert protocol.events_file(0) == protocol.EVENTS_FILE == "events.jsonl"
    assert protocol.events_file(3) == "events.rank3.jsonl"
    for rank in (0, 1, 10):
        (tmp_path / protocol.events_file(rank)).write_text("")
    (tmp_path / protocol.SUMMARY_FILE).write_text("{}")
    assert list(protocol.rank_files(tmp_path)) == [0, 1, 10]


# ------------------------------------------------------------------ the import graph

def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path):
    """(memlab module imported, at module level?) for every import in a file, lazy ones included."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module; `from mod import name` the module holding the name
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "memlab" and target in MODULES:
                found.add((target, id(node) in top_level))
    return found


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _reaches(start):
    """Every memlab module `start` imports, directly or through others (lazy imports included)."""
    seen, todo = set(), [start]
    while todo:
        for target, _ in GRAPH[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_engine_imports_nothing_user_facing():
    user_facing = ("memlab.lab", "memlab.cli", "memlab.views")
    for name in MODULES:
        if name.startswith("memlab.engine"):
            direct = {t for t, _ in GRAPH[name]}
            assert not [t for t in direct if t.startswith(user_facing)], name


def test_the_run_protocol_summary_units_and_errors_stand_alone():
    for name in ("memlab.protocol", "memlab.summary", "memlab.units", "memlab.errors", "memlab.engine.watchdog"):
        assert not [t for t in _reaches(name) if t.startswith(("memlab.lab", "memlab.cli", "memlab.views",
                                                                "memlab.runs", "memlab.knobs", "memlab.sizing"))]
    assert not GRAPH["memlab.engine.watchdog"]  # standard library only


def test_views_and_the_run_store_import_one_way():
    # the views import the summary, never the run store back through it
    for name in ("memlab.runs", "memlab.summary", "memlab.protocol", "memlab.lab"):
        assert name not in _reaches(name), f"{name} is in an import cycle"
    # runs and lab reach the views only inside the methods that draw (Run.plot, Lab.dashboard, ...)
    for name in ("memlab.runs", "memlab.lab"):
        assert not [t for t, top in GRAPH[name] if t.startswith("memlab.views") and top], name
    assert "memlab.runs" not in {t for t, _ in GRAPH["memlab.views.report"] | GRAPH["memlab.views.figures"]}


def test_importing_the_lab_imports_no_plotting_nor_the_engine():
    import subprocess
    import sys

    code = ("import sys, memlab, memlab.lab, memlab.runs, memlab.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('plotly', 'torch', 'deepspeed', "
            "'ipywidgets', 'transformers')); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_a_zombie_is_not_alive():
    """A lab killed a moment ago is a zombie until its parent reaps it: for the
    worker and the watchdog it is gone already (kill(pid, 0) would say alive)."""
    import subprocess
    import sys

    from helpers import wait_for

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_for(lambda: open(f"/proc/{child.pid}/stat").read().rpartition(")")[2].split()[0] == "Z")
    assert not protocol.alive(child.pid)
    child.wait()
    assert not protocol.alive(child.pid)
    assert protocol.alive(os.getpid())

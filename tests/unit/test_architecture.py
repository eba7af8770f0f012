"""The shape of memlab's imports, read from the source with `ast` (nothing is imported).

Data flows one way (knobs and model -> plan -> worker -> events -> run ->
views): no module under memlab/ imports, at module level or inside a
function, a module that imports it back, and the engine (which runs in the
worker process) imports nothing user-facing.
"""
import ast
import os
import sys

import memlab

PACKAGE = "memlab"
ROOT = os.path.dirname(memlab.__file__)
USER_FACING = ("memlab.lab", "memlab.cli", "memlab.views")  # what memlab/engine/ must not import


def module_files():
    """Dotted module name -> file, for every module under memlab/."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            parts = os.path.relpath(os.path.join(folder, name), os.path.dirname(ROOT))[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = os.path.join(folder, name)
    return found


def _resolve(module, is_package, level, target):
    """The absolute name of a (possibly relative) `from ... import` base."""
    if level == 0:
        return target
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module, path, modules):
    """The memlab modules `module` imports anywhere in its file (module level,
    in functions and classes): {imported module: first line}."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_package = os.path.basename(path) == "__init__.py"
    out = {}

    def add(name, line):
        # the longest prefix that is one of memlab's modules (`memlab.x.y` of `memlab.x.y.attr`)
        parts = name.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        if parts:
            out.setdefault(".".join(parts), line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            if not (base == PACKAGE or base.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                add(submodule if submodule in modules else base, node.lineno)
    out.pop(module, None)
    return out


def import_graph():
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def tangles(graph):
    """Every strongly connected group of two or more modules (Tarjan): sets of
    modules each of which imports every other, directly or not."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def cycles(graph):
    """One closed import path through each tangle: ["a", "b", "a"]."""
    return [_closed_path(graph, group) for group in tangles(graph)]


def _closed_path(graph, group):
    """A shortest cycle through the group's first module (breadth first)."""
    start = min(group)
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if succ in group and succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"no cycle through {start}")  # cannot happen in a strongly connected group


def _describe(graph, path):
    return " -> ".join(path) + "   (" + ", ".join(
        f"{a} line {graph[a][b]}" for a, b in zip(path, path[1:])) + ")"


def test_every_module_is_read():
    modules = module_files()
    for name in ("memlab", "memlab.knobs", "memlab.sizing", "memlab.ds_rules", "memlab.engine.worker",
                 "memlab.engine.memascend", "memlab.engine.memascend.bounded_staging"):
        assert name in modules
    graph = import_graph()
    assert "memlab.ds_rules" in graph["memlab.knobs"]  # module level, relative
    assert "memlab.engine.memascend" in graph["memlab.engine.worker"]  # inside a function: `from . import ...`
    assert "memlab.ds_rules" in graph["memlab.engine.memascend.bounded_staging"]  # `from ...ds_rules import`


def test_the_cycle_finder_finds_lazy_and_relative_cycles():
    graph = {"memlab.a": {"memlab.b": 3}, "memlab.b": {"memlab.c": 7}, "memlab.c": {"memlab.a": 9},
             "memlab.d": {"memlab.a": 1}}
    assert cycles(graph) == [["memlab.a", "memlab.b", "memlab.c", "memlab.a"]]
    assert cycles({"memlab.a": {"memlab.b": 1}, "memlab.b": {}}) == []
    assert _resolve("memlab.engine.worker", False, 2, "sizing") == "memlab.sizing"
    assert _resolve("memlab.engine.memascend", True, 3, "knobs") == "memlab.knobs"
    assert _resolve("memlab.engine.memascend", True, 1, None) == "memlab.engine.memascend"


def test_no_import_cycles():
    graph = import_graph()
    lines = []
    for group in tangles(graph):
        path = _closed_path(graph, group)
        lines.append("  " + _describe(graph, path))
        if len(group) > len(path) - 1:
            lines.append("    (the same tangle also takes in " + ", ".join(sorted(group - set(path))) + ")")
    assert not lines, "import cycles under memlab/ (module-level and lazy imports):\n" + "\n".join(lines)


def test_the_engine_imports_nothing_user_facing():
    graph = import_graph()
    bad = [f"  {module} imports {target} (line {line})"
           for module, targets in sorted(graph.items()) if module.startswith("memlab.engine")
           for target, line in sorted(targets.items())
           if any(target == name or target.startswith(name + ".") for name in USER_FACING)]
    assert not bad, "memlab/engine/ must not import memlab.lab, memlab.cli or memlab.views:\n" + "\n".join(bad)


def test_the_rules_import_nothing_of_memlab():
    """memlab.ds_rules is DeepSpeed's rules, standard library only; knobs takes
    them from there, not from sizing (sizing may import knobs, not the reverse)."""
    graph = import_graph()
    assert graph["memlab.ds_rules"] == {}
    with open(os.path.join(ROOT, "ds_rules.py")) as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imported <= set(sys.stdlib_module_names), imported
    assert "memlab.sizing" not in graph["memlab.knobs"]

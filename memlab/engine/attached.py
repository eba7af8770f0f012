"""memlab's engine switches inside a DeepSpeed program memlab did not start.

memlab's worker installs the `memascend.*` switches before it builds its
engine. A program of someone else's (DeepSpeed's own unit tests, a user's
training script) gets them the same way through its environment:
`environment(spec)` gives a child process `MEMLAB_SWITCHES` and memlab's
`site` folder on PYTHONPATH, whose sitecustomize calls
`install_from_environment()` at interpreter start; that waits for the
program to import deepspeed and then installs the switches, before any
engine exists. Every process the program starts (spawned ranks, pools)
inherits the environment, so every one of them runs the switched engine.

What the worker passes to the switches from its plan is derived here from
the engine itself: the staging bound from the sub-groups DeepSpeed builds,
direct storage's region under each nvme_path the program uses.
"""
import importlib.abc
import importlib.util
import os
import sys

from ..errors import KnobError
from ..optimizations import BY_SWITCH, OPTIMIZATIONS

ENV = "MEMLAB_SWITCHES"  # "all", or switch names separated by commas
SITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "site")
_installed = []


def switch_values(spec):
    """The flat knobs the switch installers read, for `spec` ("all" or "a,b")."""
    from ..knobs import Knobs

    names = [o.switch for o in OPTIMIZATIONS] if spec.strip() == "all" else [n.strip() for n in spec.split(",")
                                                                            if n.strip()]
    unknown = [n for n in names if n not in BY_SWITCH]
    if unknown or not names:
        raise KnobError(ENV, spec, f"name 'all' or switches among {', '.join(BY_SWITCH)}")
    return Knobs({name: BY_SWITCH[name].optimized for name in names}).flat()


def environment(spec, env=None):
    """`env` (default: this process's) for a program whose DeepSpeed runs the switches `spec`."""
    from .. import oplocks

    values = switch_values(spec)  # a bad spec fails here, before anything starts
    env = dict(os.environ if env is None else env)
    env[ENV] = spec
    for optimization in OPTIMIZATIONS:
        if values[optimization.switch] == optimization.optimized:
            for name, value in optimization.environment:
                optimization.check_environment(name, name, env.get(name))  # a different value there: refused
                env[name] = str(value)
    package_root = os.path.dirname(os.path.dirname(SITE_DIR))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE_DIR, package_root, env.get("PYTHONPATH")]))
    oplocks.use_extensions_root(env)  # the ops set-up built
    return env


def install_from_environment():
    """Install the switches `MEMLAB_SWITCHES` names once deepspeed is imported (now, if it is)."""
    spec = os.environ.get(ENV)
    if spec:
        after_import("deepspeed", lambda _module: install(spec))


def install(spec):
    """Install the switches now (deepspeed importable; once per process)."""
    if _installed:
        return _installed[0]
    from ..telemetry import EventWriter
    from . import memascend
    from .probes import Probes

    # the switches report what they allocate to probes; nobody reads these here
    probes = Probes(EventWriter(os.devnull))
    _installed.append(memascend.install(switch_values(spec), {"probes": probes}))
    return _installed[0]


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `callback(module)` right after the module `name` has been executed."""

    def __init__(self, name, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # find the real module with the finders after this one
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_callback(module):
            exec_module(module)
            callback(module)

        spec.loader.exec_module = exec_then_callback
        return spec


def after_import(name, callback):
    if name in sys.modules:
        callback(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))

"""On PYTHONPATH of a program memlab attaches to (memlab.engine.attached):
installs memlab's engine switches once the program imports deepspeed, then
runs the sitecustomize this one hides, if there is one."""
import importlib.machinery
import importlib.util
import os
import sys


def _run_hidden_sitecustomize():
    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


from memlab.engine import attached  # noqa: E402  (memlab's package root is on PYTHONPATH beside this)

attached.install_from_environment()
_run_hidden_sitecustomize()

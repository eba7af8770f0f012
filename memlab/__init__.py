"""memlab: see and cut the host memory of SSD-offloaded LLM fine-tuning.

Importing memlab is fast: it imports neither torch nor deepspeed. The engine
runs in a worker process (memlab.engine).
"""
from .errors import InputError, MemlabError
from .knobs import KnobError, Knobs
from .lab import Lab
from .models import ModelSpec, ModelSpecError
from .runs import Run, load_run
from .sizing import Estimate, Hardware, estimate, fit


def sizing_panel(run=None, **options):
    """The what-if sizing panel (ipywidgets + plotly; imported on first use):
    model, knobs and hardware in; host memory by component for DeepSpeed's
    engine and MemAscend's, and peak host memory against sequence length.
    Fed a finished Run, it overlays predicted and measured components."""
    from .views.sizing_panel import sizing_panel as build

    return build(run=run, **options)


__all__ = ["Lab", "Knobs", "ModelSpec", "Run", "load_run", "KnobError", "ModelSpecError", "estimate", "fit",
           "sizing_panel", "Estimate", "Hardware", "MemlabError", "InputError"]
__version__ = "0.1.0"

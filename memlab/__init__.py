"""memlab: see and cut the host memory of SSD-offloaded LLM fine-tuning.

Importing memlab is fast: it imports neither torch nor deepspeed. The engine
runs in a worker process (memlab.engine).
"""
from .knobs import KnobError, Knobs
from .lab import Lab
from .models import ModelSpec, ModelSpecError
from .runs import Run, load_run

__all__ = ["Lab", "Knobs", "ModelSpec", "Run", "load_run", "KnobError", "ModelSpecError"]
__version__ = "0.1.0"

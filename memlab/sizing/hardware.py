"""The machine an estimate is for (`Hardware`), and the error for a hardware
description or fit request memlab cannot use."""
import math
from dataclasses import dataclass
from typing import Optional

from ..errors import InputError
from ..units import GiB

ACCELERATORS = ("cpu", "cuda")
MAX_MEMORY_BYTES = 1 << 50  # 1 PiB per node or per GPU: anything above is a unit slip


class SizingError(InputError):
    """A hardware description or fit request memlab cannot use (one-line message)."""


@dataclass(frozen=True)
class Hardware:
    """The machine an estimate is for. `ram_bytes` and `gpu_bytes` are budgets
    (per node, per GPU); None means "not given". `accelerator="cpu"` is
    DeepSpeed's CPU accelerator (device-side tensors are host memory);
    "cuda" puts activations, gathered parameters and reduce buckets on the GPUs."""

    ram_bytes: Optional[int] = None
    gpus: int = 0  # per node
    gpu_bytes: Optional[int] = None  # per GPU
    ranks_per_node: int = 1
    nodes: int = 1
    accelerator: str = "cpu"

    def __post_init__(self):
        if self.accelerator not in ACCELERATORS:
            raise SizingError(f"hardware.accelerator={self.accelerator!r}: must be cpu or cuda")
        for name in ("ranks_per_node", "nodes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SizingError(f"hardware.{name}={value!r}: must be a whole number >= 1")
        if not isinstance(self.gpus, int) or isinstance(self.gpus, bool) or self.gpus < 0:
            raise SizingError(f"hardware.gpus={self.gpus!r}: must be a whole number >= 0")
        for name in ("ram_bytes", "gpu_bytes"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise SizingError(f"hardware.{name}={value!r}: must be a positive, finite number of bytes or None")
            if value > MAX_MEMORY_BYTES:
                raise SizingError(f"hardware.{name}={value!r}: more than 1 PiB; is the unit right (GiB, not bytes)?")
        if self.gpu_bytes is not None and not self.gpus:
            raise SizingError(f"hardware.gpu_bytes={self.gpu_bytes!r}: GPU memory given without GPUs; "
                              f"set gpus (--gpus N) or leave the GPU memory out")
        if self.accelerator == "cuda" and self.gpus and self.ranks_per_node > self.gpus:
            raise SizingError(f"hardware.ranks_per_node={self.ranks_per_node}: more ranks than the {self.gpus} GPUs "
                              f"of a node (one rank per GPU)")

    @property
    def world_size(self):
        return self.ranks_per_node * self.nodes

    @property
    def cuda(self):
        return self.accelerator == "cuda"

    @classmethod
    def cuda_node(cls, gpus=1, gpu_bytes=80 * GiB, ram_bytes=None, nodes=1):
        """A CUDA node with one rank per GPU."""
        return cls(ram_bytes=ram_bytes, gpus=gpus, gpu_bytes=gpu_bytes, ranks_per_node=max(1, gpus), nodes=nodes,
                   accelerator="cuda")

    @classmethod
    def this_machine(cls):
        """This machine: its RAM, the CPU accelerator, one rank."""
        import os

        return cls(ram_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))

    def to_dict(self):
        return {"ram_bytes": self.ram_bytes, "gpus": self.gpus, "gpu_bytes": self.gpu_bytes,
                "ranks_per_node": self.ranks_per_node, "nodes": self.nodes, "accelerator": self.accelerator}

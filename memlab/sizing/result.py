"""What an estimate answers: the host buffers it predicts (`Buffer`) and the
whole prediction (`Estimate`: host bytes per component and phase, pinned bytes,
GPU figures, NVMe footprint, bytes swapped per step)."""
from dataclasses import dataclass, field
from typing import Optional

from .. import components as C
from ..units import format_bytes
from .hardware import Hardware


@dataclass(frozen=True)
class Buffer:
    """One host allocation as the probes record it (an `alloc` event)."""

    component: str
    requested: int
    reserved: int
    backend: str  # aio-mlock | native-mlock | torch-pinned | pageable
    what: str = ""


@dataclass
class Estimate:
    """What one configuration needs, per rank unless a field says per node.

    `phases[name][component]` is host bytes during each phase; the peak is the
    largest phase. Components use the probes' names, in the meaning
    memlab.components gives them; `as_probed()` re-attributes them the way the
    probes can observe them, for comparison with a measured run."""

    model: str
    engine: str
    knobs: dict
    hardware: Hardware
    buffers: list
    phases: dict
    peak_phase: str
    gpu: Optional[dict]
    nvme_bytes: int
    swap_per_step: dict
    swap_first_step: dict
    tokens: int
    num_params: int = 0  # the model's parameters, each tied weight once (as transformers builds it)
    notes: list = field(default_factory=list)
    probe_hidden: dict = field(default_factory=dict)  # phase -> bytes the probes cannot see (optimizer transients)

    # -- per rank ----------------------------------------------------------------------
    @property
    def components(self):
        """Host bytes by component at the peak phase."""
        return dict(self.phases[self.peak_phase])

    @property
    def peak_host_bytes(self):
        return _rss(self.phases[self.peak_phase])

    @property
    def peak_engine_host_bytes(self):
        return max(_engine(p) for p in self.phases.values())

    @property
    def pinned_reserved_bytes(self):
        return sum(b.reserved for b in self.buffers if b.backend != "pageable")

    @property
    def pinned_requested_bytes(self):
        return sum(b.requested for b in self.buffers if b.backend != "pageable")

    @property
    def locked_bytes(self):
        """Bytes mlock'ed (VmLck): the aio pools and, with native pinning, the pinned buffers."""
        return sum(b.reserved for b in self.buffers if b.backend in ("aio-mlock", "native-mlock"))

    @property
    def swap_read_bytes_per_step(self):
        return sum(v for k, v in self.swap_per_step.items() if k.startswith("in."))

    @property
    def swap_write_bytes_per_step(self):
        return sum(v for k, v in self.swap_per_step.items() if k.startswith("out."))

    # -- per node -------------------------------------------------------------------------
    @property
    def node_peak_host_bytes(self):
        return self.peak_host_bytes * self.hardware.ranks_per_node

    @property
    def node_components(self):
        return {k: v * self.hardware.ranks_per_node for k, v in self.components.items()}

    @property
    def node_pinned_reserved_bytes(self):
        return self.pinned_reserved_bytes * self.hardware.ranks_per_node

    @property
    def node_nvme_bytes(self):
        return self.nvme_bytes * self.hardware.ranks_per_node

    @property
    def gpu_peak_bytes(self):
        return None if self.gpu is None else self.gpu["total"]

    # -- budgets --------------------------------------------------------------------------
    def fits(self, ram_bytes=None, gpu_bytes=None):
        """Whether the node's host peak fits `ram_bytes` (default: hardware.ram_bytes)
        and each GPU's peak fits `gpu_bytes` (default: hardware.gpu_bytes)."""
        ram = self.hardware.ram_bytes if ram_bytes is None else ram_bytes
        gpu = self.hardware.gpu_bytes if gpu_bytes is None else gpu_bytes
        if ram is not None and self.node_peak_host_bytes > ram:
            return False
        if gpu is not None and self.gpu is not None and self.gpu["total"] > gpu:
            return False
        return True

    def largest_component(self, include_framework=False):
        parts = {k: v for k, v in self.components.items() if include_framework or k != C.FRAMEWORK}
        return max(parts, key=parts.get)

    # -- the probes' view -------------------------------------------------------------------
    def as_probed(self):
        """Per phase, components as the probes attribute them: transients no hook
        records (fp16's overflow temporaries) are heap blocks in flight, `activations`
        to the probes. RSS is unchanged."""
        out = {}
        for phase, parts in self.phases.items():
            parts = dict(parts)
            hidden = self.probe_hidden.get(phase, 0)
            parts[C.OPTIMIZER_TRANSIENTS] -= hidden
            parts[C.ACTIVATIONS] += hidden
            out[phase] = parts
        return out

    def probed_at(self, phase, step=None):
        """Components as the probes attribute them in the phase a run's sample names (its
        `phase` and `step`, as in the summary's `peak_phase` / `peak_step`): step 1's optimizer
        step is `optimizer_step_first`; other phases are the same at every step."""
        if phase == "optimizer_step" and step == 1:
            phase = "optimizer_step_first"
        return self.as_probed()[phase]

    @property
    def probed_peak_engine_host_bytes(self):
        """`peak_engine_host_bytes` as a run's summary measures it (probes' attribution)."""
        return max(_engine(p) for p in self.as_probed().values())

    # -- output -------------------------------------------------------------------------------
    def to_dict(self):
        return {
            "model": self.model, "num_params": self.num_params, "engine": self.engine,
            "hardware": self.hardware.to_dict(), "tokens": self.tokens,
            "peak_phase": self.peak_phase, "peak_host_bytes": self.peak_host_bytes,
            "peak_engine_host_bytes": self.peak_engine_host_bytes,
            "node_peak_host_bytes": self.node_peak_host_bytes,
            "components": self.components, "node_components": self.node_components,
            "phases": {k: dict(v) for k, v in self.phases.items()},
            "pinned_reserved_bytes": self.pinned_reserved_bytes, "pinned_requested_bytes": self.pinned_requested_bytes,
            "locked_bytes": self.locked_bytes,
            "buffers": [b.__dict__.copy() for b in self.buffers],
            "gpu": None if self.gpu is None else dict(self.gpu),
            "nvme_bytes": self.nvme_bytes, "node_nvme_bytes": self.node_nvme_bytes,
            "swap_per_step": dict(self.swap_per_step), "swap_first_step": dict(self.swap_first_step),
            "swap_read_bytes_per_step": self.swap_read_bytes_per_step,
            "swap_write_bytes_per_step": self.swap_write_bytes_per_step,
            "fits": self.fits() if (self.hardware.ram_bytes or self.hardware.gpu_bytes) else None,
            "knobs": dict(self.knobs), "notes": list(self.notes),
        }

    def table(self):
        """The estimate as plain text (what `memlab estimate` prints)."""
        hw = self.hardware
        lines = [f"{self.model} ({self.num_params:,} parameters)  engine={self.engine}  "
                 f"{self.knobs['run.micro_batch']} x {self.knobs['run.seq_len']} "
                 f"tokens  {self.knobs['run.dtype']}  {hw.accelerator}  {hw.ranks_per_node} rank(s)/node x "
                 f"{hw.nodes} node(s)", f"host memory per rank at the peak ({self.peak_phase}):"]
        for name in C.ALL:
            value = self.components.get(name, 0)
            if value:
                lines.append(f"  {name:24s} {_fmt(value):>12s}")
        lines.append(f"  {'peak host':24s} {_fmt(self.peak_host_bytes):>12s}")
        if hw.ranks_per_node > 1:
            lines.append(f"  {'peak host per node':24s} {_fmt(self.node_peak_host_bytes):>12s}")
        lines.append(f"  {'engine host (peak)':24s} {_fmt(self.peak_engine_host_bytes):>12s}")
        lines.append(f"  {'pinned reserved/requested':24s} {_fmt(self.pinned_reserved_bytes):>12s} / "
                     f"{_fmt(self.pinned_requested_bytes)}  (locked {_fmt(self.locked_bytes)})")
        if self.gpu is not None:
            g = self.gpu
            lines.append(f"GPU per device: {_fmt(g['total'])} (params "
                         f"{_fmt(g['params_gathered'] + g['persistent_params'] + g['param_partitions'])},"
                         f" activations {_fmt(g['activations'])}, reduce bucket {_fmt(g['reduce_bucket'])}; "
                         f"with gradient checkpointing {_fmt(g['activations_checkpointed'])}, "
                         f"without {_fmt(g['activations_full'])})")
        lines.append(f"NVMe per rank: {_fmt(self.nvme_bytes)};  swapped per step: read "
                     f"{_fmt(self.swap_read_bytes_per_step)}, write {_fmt(self.swap_write_bytes_per_step)}")
        if hw.ram_bytes or hw.gpu_bytes:
            lines.append(f"fits: {'yes' if self.fits() else 'NO'}"
                         + (f" (RAM {_fmt(hw.ram_bytes)})" if hw.ram_bytes else "")
                         + (f" (GPU {_fmt(hw.gpu_bytes)})" if hw.gpu_bytes else ""))
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def __repr__(self):
        return (f"<Estimate {self.model} {self.engine} peak {_fmt(self.peak_host_bytes)} ({self.peak_phase}), "
                f"engine {_fmt(self.peak_engine_host_bytes)}>")


def _fmt(n):
    return format_bytes(n, smallest="MiB")


def _rss(parts):
    return sum(v for k, v in parts.items() if k not in C.OUTSIDE_RSS)


def _engine(parts):
    return sum(v for k, v in parts.items() if k not in C.NOT_ENGINE)

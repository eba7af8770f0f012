"""Knobs: every setting of a run, validated before any process starts.

DeepSpeed's own knobs keep DeepSpeed's JSON names and nesting
(`zero_optimization.offload_param.buffer_count`, `aio.block_size`, ...), so a
user can paste a `ds_config.json` and get one back. memlab's own settings live
beside them: `run.*` (run shape), `allocator.*` (glibc and pinning
environment) and `memascend.*` (the engine's optimizations).

Knobs are immutable; `set()` returns a new Knobs. `resolve(model)` replaces
"auto" values with numbers derived from the model and checks everything that
needs the model (the traps DeepSpeed accepts and then crashes on).
"""
import copy
import difflib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .ds_rules import (DTYPE_BYTES, FP32, aligned_numel, largest_module_group, largest_sub_group, stale_gradient_reads,
                       staging_plan, swappable)
from .ds_rules import cpu_fp16_supported as _cpu_fp16_supported  # module globals, so that tests can replace them
from .ds_rules import cuda_present as _cuda_present
from .errors import KnobError
from .optimizations import OPTIMIZATIONS




AUTO = "auto"
# "auto" in a Hugging Face Trainer / accelerate ds_config: resolved the way the Trainer resolves it
# (transformers.integrations.deepspeed, HfTrainerDeepSpeedConfig.trainer_config_process), from the model's
# hidden size. memlab's own "auto" for reduce_bucket_size (the largest partition) is a different rule.
TRAINER_AUTO = "auto (HF Trainer)"
TRAINER_AUTO_RULES = {
    "zero_optimization.reduce_bucket_size": ("hidden_size^2", lambda h: h * h),
    "zero_optimization.stage3_prefetch_bucket_size": ("0.9 x hidden_size^2", lambda h: int(0.9 * h * h)),
    "zero_optimization.stage3_param_persistence_threshold": ("10 x hidden_size", lambda h: 10 * h),
}
# ...and the run-level values the Trainer fills from its TrainingArguments defaults
# (warmup_num_steps: the Trainer keeps it at least 1, since DeepSpeed 0.19.6 refuses 0)
TRAINER_DEFAULTS = {"gradient_clipping": 1.0, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
                    "warmup_min_lr": 0.0, "warmup_num_steps": 1}
# run.dtype "auto": the dtype the model's config.json names (torch_dtype), as transformers loads it
TORCH_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DEVICES = ("nvme", "cpu")
# offload_param may also be "none": partitions stay on the device (a GPU's memory; on the CPU
# accelerator the device is host RAM), the usual setting when only the optimizer is offloaded
PARAM_DEVICES = DEVICES + ("none",)
DTYPES = ("fp32", "bf16", "fp16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # transformers' attention kernels that run on any accelerator


@dataclass(frozen=True)
class Knob:
    name: str  # dotted: section.sub.key
    default: Any
    kind: str  # int | float | bool | choice | path | str
    doc: str
    choices: Tuple = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    auto: bool = False  # accepts "auto", resolved from the model
    optional: bool = False  # accepts None
    ds_default: Any = None  # DeepSpeed's own default where memlab's differs


def _k(name, default, kind, doc, **kw):
    return Knob(name, default, kind, doc, **kw)


# Defaults: DeepSpeed 0.19.8's, except where DeepSpeed's default hides the
# behaviour memlab exists to measure (max_in_cpu=1e9: a model under 1e9
# elements never swaps parameters), crashes once parameters really swap
# (stage3_max_live_parameters, stage3_max_reuse_distance of 1e9), or sizes
# buffers far beyond a small model (buffer_size, sub_group_size,
# reduce_bucket_size: `auto`, from the model); those carry `ds_default`.
SPECS = [
    # --- zero_optimization.offload_param
    _k("zero_optimization.offload_param.device", "nvme", "choice",
       "where parameters are offloaded (none: kept on the device, only the optimizer offloaded)", choices=PARAM_DEVICES),
    _k("zero_optimization.offload_param.buffer_count", 5, "int", "parameter swap buffers", minimum=1),
    _k("zero_optimization.offload_param.buffer_size", AUTO, "int",
       "elements per parameter swap buffer; auto = the largest parameter partition", minimum=1, auto=True,
       ds_default=int(1e8)),
    _k("zero_optimization.offload_param.max_in_cpu", 0, "int",
       "parameter elements kept in a CPU flat buffer instead of swapped (DeepSpeed's 1e9 means no swapping at all "
       "for models under 1e9 elements)", minimum=0, ds_default=int(1e9)),
    _k("zero_optimization.offload_param.pin_memory", True, "bool", "pin/lock the parameter buffers"),
    # --- zero_optimization.offload_optimizer
    _k("zero_optimization.offload_optimizer.device", "nvme", "choice", "where optimizer state is offloaded",
       choices=DEVICES),
    _k("zero_optimization.offload_optimizer.buffer_count", 4, "int", "optimizer swap buffers", minimum=1),
    _k("zero_optimization.offload_optimizer.pin_memory", True, "bool", "pin/lock optimizer buffers and gradients"),
    _k("zero_optimization.offload_optimizer.pipeline_read", False, "bool", "overlap optimizer state reads"),
    _k("zero_optimization.offload_optimizer.pipeline_write", False, "bool", "overlap optimizer state writes"),
    _k("zero_optimization.offload_optimizer.fast_init", False, "bool", "skip per-sub-group init buffers"),
    _k("zero_optimization.offload_optimizer.ratio", 1.0, "float", "fraction of optimizer state offloaded",
       minimum=0.0, maximum=1.0),
    # --- zero_optimization
    _k("zero_optimization.sub_group_size", AUTO, "int",
       "parameter elements per optimizer sub-group; auto = the largest parameter partition", minimum=1, auto=True,
       ds_default=int(1e9)),
    _k("zero_optimization.stage3_max_live_parameters", 0, "int",
       "gathered parameter elements kept live (0 releases each after use)", minimum=0, ds_default=int(1e9)),
    _k("zero_optimization.stage3_max_reuse_distance", 0, "int",
       "keep a gathered parameter if reused within this many elements", minimum=0, ds_default=int(1e9)),
    _k("zero_optimization.stage3_prefetch_bucket_size", int(5e7), "int", "parameter elements prefetched",
       minimum=0),
    _k("zero_optimization.stage3_param_persistence_threshold", int(1e5), "int",
       "parameters below this many elements stay unpartitioned", minimum=0),
    _k("zero_optimization.reduce_bucket_size", AUTO, "int",
       "gradient reduce bucket elements; auto = the largest parameter partition (host RAM on the CPU accelerator)",
       minimum=1, auto=True, ds_default=int(5e8)),
    _k("zero_optimization.contiguous_gradients", True, "bool", "copy gradients into a contiguous buffer"),
    # --- aio
    _k("aio.block_size", 1048576, "int", "bytes per I/O request; tensors below it are not swapped", minimum=4096),
    _k("aio.queue_depth", 8, "int", "I/O requests in flight", minimum=1),
    _k("aio.intra_op_parallelism", 1, "int", "I/O threads per handle", minimum=1, maximum=64),
    _k("aio.single_submit", False, "bool", "submit requests one at a time"),
    _k("aio.overlap_events", True, "bool", "overlap submission and completion"),
    _k("aio.use_gds", False, "bool", "GPUDirect Storage (CUDA only)"),
    # --- data_types
    _k("data_types.grad_accum_dtype", None, "choice", "gradient accumulation dtype (None = model dtype)",
       choices=DTYPES, optional=True),
    # --- run shape (memlab)
    _k("run.micro_batch", 1, "int", "sequences per step", minimum=1),
    _k("run.seq_len", 128, "int", "tokens per sequence", minimum=2),
    _k("run.dtype", AUTO, "choice", "training dtype; auto = the model's torch_dtype (fp32 when it names none)",
       choices=DTYPES, auto=True),
    _k("run.attn_implementation", AUTO, "choice",
       "transformers' attention kernel (eager keeps each layer's attention probabilities for backward: bytes "
       "quadratic in seq_len); auto = transformers' default for the model", choices=ATTN_IMPLEMENTATIONS, auto=True),
    _k("run.steps", 3, "int", "optimizer steps", minimum=1),
    _k("run.grad_accum", 1, "int", "micro-batches whose gradients are summed per optimizer step "
       "(DeepSpeed's gradient_accumulation_steps)", minimum=1),
    _k("run.gradient_checkpointing", False, "bool", "recompute activations in backward"),
    _k("run.seed", 0, "int", "seed for weights and synthetic data", minimum=0),
    _k("run.lr", 1e-4, "float", "Adam learning rate", minimum=0.0),
    _k("run.swap_dir", None, "path", "folder under which each run gets its own swap folder "
       "(default $MEMLAB_SWAP_DIR or <tmp>/memlab-swap)", optional=True),
    _k("run.ranks", 1, "int", "ranks per node, started by DeepSpeed's launcher when above 1", minimum=1,
       maximum=64),
    _k("run.hostfile", None, "path", "DeepSpeed hostfile for several nodes (each line: host slots=N)",
       optional=True),
    _k("run.budget", None, "bytes", "host memory the worker may use ('6GiB'); over it the run ends over_budget",
       optional=True),
    _k("run.save_checkpoint_at", 0, "int", "save a DeepSpeed checkpoint (engine.save_checkpoint) after this step "
       "into run.checkpoint_dir; 0 = never", minimum=0),
    _k("run.checkpoint_dir", None, "path", "where run.save_checkpoint_at saves (default <run folder>/checkpoint)",
       optional=True),
    _k("run.resume_from", None, "path", "a DeepSpeed checkpoint folder (one holding 'latest') to load before "
       "training: the run continues its steps, batches and optimizer state", optional=True),
    _k("run.telemetry", True, "bool", "probes and sampler on (off only to measure their overhead)"),
    _k("run.sample_hz", 13.0, "float", "sampler frequency", minimum=1.0, maximum=50.0),
    # --- memascend settings that are not on/off switches
    _k("memascend.staging_elements", AUTO, "int",
       "staging bound of memascend.optimizer_staging=bounded, in elements: every swapped sub-group is stepped "
       "in slices through buffers of this size; auto = the largest sub-group, at most 4194304. Gradients are cut "
       "where slices start, and a piece below DeepSpeed's swap floor (aio.block_size, at least 1 MiB) stays in "
       "RAM until the step", minimum=2048,
       auto=True),
    _k("memascend.storage_device", None, "path",
       "raw block device for memascend.storage=direct (used only when named; its contents are overwritten)",
       optional=True),
    # --- allocator environment (memlab)
    _k("allocator.DS_PIN_MEMORY_BACKEND", "torch", "choice", "DeepSpeed's pinning backend",
       choices=("torch", "native")),
    _k("allocator.MALLOC_ARENA_MAX", None, "int", "glibc malloc arenas", minimum=1, optional=True),
    _k("allocator.MALLOC_TRIM_THRESHOLD_", None, "int", "glibc trim threshold (bytes)", minimum=0, optional=True),
    # Unset, glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), so which
    # tensors land in the heap depends on the order of frees; set, it stays put and heap_free is predictable.
    _k("allocator.MALLOC_MMAP_THRESHOLD_", None, "int", "glibc mmap threshold (bytes; fixed, not dynamic)",
       minimum=0, maximum=32 << 20, optional=True),
    _k("allocator.malloc_trim", "never", "choice", "call malloc_trim(0) explicitly", choices=("never", "each_step")),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}

# memascend.* switches: name -> (DeepSpeed's behaviour, the optimized value), and what each does; one
# record each in memlab/optimizations.py. engine="memascend" turns all on.
MEMASCEND_SWITCHES = {o.switch: (o.stock, o.optimized) for o in OPTIMIZATIONS}
MEMASCEND_DOCS = {o.switch: o.doc for o in OPTIMIZATIONS}
ENGINES = ("deepspeed", "memascend", "custom")


# DeepSpeed zero_optimization keys that do not change host memory: memlab
# keeps them and hands them back to DeepSpeed as they are.
DS_ZERO_UNMODELED = frozenset({
    "overlap_comm", "reduce_scatter", "allgather_partitions", "allgather_bucket_size", "round_robin_gradients",
    "load_from_fp32_weights", "elastic_checkpoint", "ignore_unused_parameters", "legacy_stage1",
    "stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "mics_shard_size", "mics_hierarchical_params_gather", "memory_efficient_linear",
    "pipeline_loading_checkpoint", "override_module_apply", "log_trace_cache_warnings",
    "use_all_reduce_for_fetch_params", "stage3_module_granularity_threshold", "module_granularity_threshold",
    "use_multi_rank_bucket_allreduce", "round_robin_gradients", "cpu_offload", "cpu_offload_params",
    "cpu_offload_use_pin_memory", "sub_group_buffer_count", "prefetch_bucket_size", "param_persistence_threshold",
    "model_persistence_threshold", "max_live_parameters", "max_reuse_distance",
    "offload_optimizer.super_offload", "offload_optimizer.cpuadam_cores_perc",
})
OPTIMIZERS = ("Adam", "AdamW")  # what DeepSpeedCPUAdam (and memlab's bounded staging) runs


def _optimizer_section(value, source):
    kind = value.get("type", "Adam")
    if not isinstance(kind, str) or kind.lower() not in [o.lower() for o in OPTIMIZERS]:
        raise KnobError(f"{source}:optimizer.type", kind, f"memlab runs {' or '.join(OPTIMIZERS)} (DeepSpeed's CPU Adam)")
    params = value.get("params", {})
    if not isinstance(params, dict):
        raise KnobError(f"{source}:optimizer.params", params, "must be an object")
    return {**value, "type": kind, "params": dict(params)}


def _trainer_auto(name, source):
    """A ds_config "auto" under zero_optimization, as the HF Trainer fills it; an "auto" the Trainer
    leaves alone would reach DeepSpeed as a string, which refuses it."""
    if name in TRAINER_AUTO_RULES:
        return TRAINER_AUTO
    spec = SPEC_BY_NAME.get(name)
    if spec is not None and spec.auto:
        return AUTO  # memlab's own rule (the spec's doc says which)
    raise KnobError(f"{source}:{name}", AUTO, "the HF Trainer fills only reduce_bucket_size, "
                    "stage3_prefetch_bucket_size and stage3_param_persistence_threshold; DeepSpeed refuses \"auto\" here")


def _closest(name, candidates):
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else ""


def _coerce(spec, value):
    """Check and normalize one value; raises KnobError naming the knob."""
    if value is None:
        if spec.optional:
            return None
        raise KnobError(spec.name, value, "must be set (None is not allowed)")
    if spec.auto and value == AUTO:
        return AUTO
    if value == TRAINER_AUTO and spec.name in TRAINER_AUTO_RULES:
        return TRAINER_AUTO
    if spec.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise KnobError(spec.name, value, "must be true or false")
    if spec.kind == "int":
        if isinstance(value, bool):
            raise KnobError(spec.name, value, "must be a whole number, not a boolean")
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else int(value)
            except ValueError:
                raise KnobError(spec.name, value, "must be a whole number" + (" or 'auto'" if spec.auto else ""))
        if isinstance(value, float):
            if not value.is_integer():
                raise KnobError(spec.name, value, "must be a whole number")
            value = int(value)
        if not isinstance(value, int):
            raise KnobError(spec.name, value, "must be a whole number" + (" or 'auto'" if spec.auto else ""))
    elif spec.kind == "float":
        if isinstance(value, bool):
            raise KnobError(spec.name, value, "must be a number, not a boolean")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise KnobError(spec.name, value, "must be a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise KnobError(spec.name, value, "must be a finite number")
    elif spec.kind == "choice":
        if value not in spec.choices:
            raise KnobError(spec.name, value, f"must be one of {', '.join(map(str, spec.choices))}")
    elif spec.kind == "bytes":
        from .units import parse_bytes

        try:
            value = parse_bytes(value)
        except ValueError as exc:
            raise KnobError(spec.name, value, str(exc))
    elif spec.kind in ("path", "str"):
        if not isinstance(value, (str, os.PathLike)):
            raise KnobError(spec.name, value, "must be a path")
        value = os.fspath(value)
        if not value:
            raise KnobError(spec.name, value, "must not be empty")
    if spec.minimum is not None and value < spec.minimum:
        raise KnobError(spec.name, value, f"must be at least {spec.minimum:g}")
    if spec.maximum is not None and value > spec.maximum:
        raise KnobError(spec.name, value, f"must be at most {spec.maximum:g}")
    return value


def read_json_object(path, knob):
    """The JSON object in a file; KnobError naming `knob` and the path otherwise."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise KnobError(knob, path, "no such file")
    except (OSError, json.JSONDecodeError) as exc:
        raise KnobError(knob, path, f"not readable JSON ({exc})")
    if not isinstance(data, dict):
        raise KnobError(knob, path, "must hold a JSON object")
    return data


def flatten(nested, prefix=""):
    """Nested dicts as dotted names: {"aio": {"block_size": 1}} -> {"aio.block_size": 1}."""
    return _flatten(nested, prefix)


def _flatten(nested, prefix=""):
    flat = {}
    for key, value in nested.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _nest(flat):
    nested = {}
    for name, value in flat.items():
        node = nested
        *path, leaf = name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


# Top-level keys of a ds_config that `--set` takes under DeepSpeed's own names, as a --knobs file does.
DS_TOP_LEVEL_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                     "gradient_clipping")


class Knobs:
    """Every knob of a run. `Knobs({"aio.block_size": 2**21}, engine="memascend")`."""

    def __init__(self, values=None, engine="deepspeed", passthrough=None, **short):
        if engine not in ENGINES:
            raise KnobError("engine", engine, f"must be one of {', '.join(ENGINES)}")
        flat = {s.name: s.default for s in SPECS}
        for name, (stock, optimized) in MEMASCEND_SWITCHES.items():
            flat[name] = optimized if engine == "memascend" else stock
        if engine == "memascend" and not MEMASCEND_SWITCHES:
            raise KnobError("engine", engine, "no MemAscend optimization is available in this version")
        given = dict(values or {})
        for key, value in short.items():  # run shape as keywords: Knobs(steps=5)
            given[f"run.{key}"] = value
        given = _flatten(given) if any(isinstance(v, dict) for v in given.values()) else given
        for name, value in given.items():
            flat[name] = self._check(name, value)
        self._values = flat
        # ds_config keys memlab does not model, handed to DeepSpeed unchanged
        self.passthrough = copy.deepcopy(dict(passthrough or {}))

    @staticmethod
    def _check(name, value):
        spec = SPEC_BY_NAME.get(name)
        if spec is None:
            if name in MEMASCEND_SWITCHES:
                stock, optimized = MEMASCEND_SWITCHES[name]
                if value not in (stock, optimized):
                    raise KnobError(name, value, f"must be {stock!r} (DeepSpeed's behaviour) or {optimized!r}")
                return value
            known = list(SPEC_BY_NAME) + list(MEMASCEND_SWITCHES)
            raise KnobError(name, value, "unknown knob" + _closest(name, known))
        return _coerce(spec, value)

    # -- access --------------------------------------------------------------
    def __getitem__(self, name):
        if name not in self._values:
            raise KnobError(name, None, "unknown knob" + _closest(name, list(self._values)))
        return self._values[name]

    def get(self, name, default=None):
        return self._values.get(name, default)

    def set(self, values=None, **short):
        """A copy with some knobs changed (dotted names, or run-shape keywords)."""
        merged = dict(self._values)
        merged.update(_flatten(values) if values and any(isinstance(v, dict) for v in values.values()) else
                      (values or {}))
        merged.update({f"run.{k}": v for k, v in short.items()})
        return Knobs(merged, passthrough=self.passthrough)

    def with_engine(self, engine):
        """A copy with every memascend switch set as `engine` says (deepspeed: all
        at DeepSpeed's behaviour, memascend: all on); other knobs unchanged."""
        values = {n: v for n, v in self._values.items() if n not in MEMASCEND_SWITCHES}
        return Knobs(values, engine=engine, passthrough=self.passthrough)

    @property
    def engine(self):
        """deepspeed (every switch at DeepSpeed's behaviour), memascend (all on) or custom."""
        if not MEMASCEND_SWITCHES:
            return "deepspeed"
        on = [self._values[n] == opt for n, (_, opt) in MEMASCEND_SWITCHES.items()]
        return "memascend" if all(on) else "deepspeed" if not any(on) else "custom"

    def to_dict(self):
        """Nested dict of every knob (JSON-safe), plus `engine` and `passthrough`."""
        out = {"engine": self.engine, **_nest(self._values)}
        if self.passthrough:
            out["passthrough"] = copy.deepcopy(self.passthrough)
        return out

    def flat(self):
        return dict(self._values)

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data.pop("engine", None)
        passthrough = data.pop("passthrough", None)
        return cls(_flatten(data), passthrough=passthrough)

    def diff(self, other):
        """{knob: (self value, other value)} for knobs that differ."""
        return {n: (v, other._values.get(n)) for n, v in self._values.items() if other._values.get(n) != v}

    def __eq__(self, other):
        return isinstance(other, Knobs) and self._values == other._values and self.passthrough == other.passthrough

    def __repr__(self):
        changed = {n: v for n, v in self._values.items() if SPEC_BY_NAME.get(n) and SPEC_BY_NAME[n].default != v}
        return f"Knobs(engine={self.engine!r}, {changed})"

    def set_ds(self, values):
        """A copy with DeepSpeed's own top-level keys (DS_TOP_LEVEL_KEYS) read as a ds_config reads them."""
        translated = Knobs.from_ds_config(dict(values), engine=self.engine)
        passthrough = {**self.passthrough, **translated.passthrough}
        return Knobs({**self._values, **translated._values}, passthrough=passthrough)

    # -- ds_config in and out --------------------------------------------------
    @classmethod
    def from_ds_config(cls, config, engine="deepspeed"):
        """Knobs from a DeepSpeed config (dict or path to ds_config.json).

        Knobs memlab models are read one by one (an unknown key is an error
        with a suggestion). DeepSpeed keys memlab does not model (other
        top-level sections, ZeRO keys such as overlap_comm, the optimizer's
        other settings) are kept and handed back to DeepSpeed unchanged."""
        source = "ds_config"
        if not isinstance(config, dict):
            source = os.fspath(config)
            config = read_json_object(source, "ds_config")
        values, passthrough = {}, {}
        for key, value in config.items():
            if key in ("zero_optimization", "aio", "data_types", "optimizer", "bf16", "fp16") and \
                    not isinstance(value, dict):
                raise KnobError(f"{source}:{key}", value, "must be an object")
            if key == "zero_optimization":
                stage = value.get("stage")
                if stage != 3:
                    raise KnobError(f"{source}:zero_optimization.stage", stage,
                                    "memlab runs ZeRO stage 3 only; set it to 3")
                if isinstance(value.get("aio"), dict):
                    raise KnobError(f"{source}:zero_optimization.aio", value["aio"],
                                    "DeepSpeed reads aio at the top level of the config (inside zero_optimization "
                                    "it refuses the config); move the section up")
                zero_extra = {}
                for name, v in _flatten(value, "zero_optimization.").items():
                    short = name[len("zero_optimization."):]
                    if short in ("stage", "offload_param.nvme_path", "offload_optimizer.nvme_path"):
                        continue  # memlab creates each run's own swap folder
                    if v == AUTO:
                        v = _trainer_auto(name, source)
                    if name not in SPEC_BY_NAME and short in DS_ZERO_UNMODELED:
                        zero_extra[short] = v
                    else:
                        values[name] = v
                if zero_extra:
                    passthrough["zero_optimization"] = _nest(zero_extra)
            elif key in ("aio", "data_types"):
                section = dict(value)
                if key == "aio" and "thread_count" in section:
                    # DeepSpeed 0.19.8 ignores it, as memlab does; say what it became
                    warnings.warn(f"memlab: {source}: aio.thread_count is the old name of aio.intra_op_parallelism; "
                                  f"DeepSpeed 0.19.8 ignores it (set intra_op_parallelism to change the I/O threads)",
                                  stacklevel=2)
                    section.pop("thread_count")
                values.update(_flatten(section, key + "."))
            elif key == "train_micro_batch_size_per_gpu":
                if value != AUTO:  # "auto": the Trainer's per-device batch, memlab's run.micro_batch
                    values["run.micro_batch"] = value
            elif key in ("bf16", "fp16"):
                if value.get("enabled") is True:  # "auto": the Trainer's default, off (fp32)
                    values["run.dtype"] = key
            elif key == "optimizer":
                optimizer = _optimizer_section(value, source)
                params = optimizer["params"]
                if "lr" in params:
                    lr = params.pop("lr")
                    if lr != AUTO:  # "auto": memlab's run.lr, as the Trainer's learning_rate
                        values["run.lr"] = lr
                params.update({k: TRAINER_DEFAULTS[k] for k, v in params.items() if v == AUTO and k in TRAINER_DEFAULTS})
                passthrough["optimizer"] = optimizer
            elif key == "gradient_accumulation_steps":
                if value != AUTO:  # "auto": the Trainer's gradient_accumulation_steps, memlab's run.grad_accum
                    values["run.grad_accum"] = value
            elif key == "train_batch_size":
                continue  # derived from run.micro_batch and run.grad_accum ("auto" too)
            elif key == "gradient_clipping" and value == AUTO:
                passthrough[key] = TRAINER_DEFAULTS[key]
            elif key == "scheduler" and isinstance(value, dict):
                passthrough[key] = value  # its "auto" params are filled from the run in to_ds_config
            else:
                passthrough[key] = value
        if {"zero_optimization", "bf16", "fp16"} & set(config) and "run.dtype" not in values:
            # a whole ds_config decides precision as DeepSpeed does: fp32 unless bf16 or fp16 is enabled
            # (the Trainer's "auto" is off by default); run.dtype "auto" is for memlab's own knobs
            values["run.dtype"] = "fp32"
        return cls(values, engine=engine, passthrough=passthrough)

    def resolve(self, model, accelerator=None):
        """Validate against a model and replace "auto"; returns ResolvedKnobs.
        `accelerator` ("cpu" | "cuda") is the machine the checks assume; None
        means this one (the what-if estimator sizes other machines)."""
        return ResolvedKnobs(self, model, accelerator)


def model_dtype(torch_dtype, cuda):
    """run.dtype "auto" for a model: (dtype, why). The config's torch_dtype, except that fp16
    on the CPU accelerator (which cannot train in fp16) runs as bf16, the same bytes."""
    dtype = TORCH_DTYPES.get(str(torch_dtype).removeprefix("torch."))
    if dtype is None:
        raise KnobError("run.dtype", AUTO, f"the model's torch_dtype {torch_dtype!r} is not one memlab trains in "
                                           f"({', '.join(TORCH_DTYPES)}); set run.dtype to one of {', '.join(DTYPES)}")
    if dtype == "fp16" and not cuda:
        return "bf16", f"memlab: the model's torch_dtype {torch_dtype}, as bf16 on the CPU accelerator (no fp16 there)"
    return dtype, f"memlab: the model's torch_dtype {torch_dtype}"


def _resolve_attention(values, spec, from_auto):
    """run.attn_implementation: "auto" is transformers' own choice for the model (sdpa where its class
    has it); sdpa asked of a class whose default is eager is refused, as transformers would refuse it."""
    default = spec.attn_implementation
    name = "run.attn_implementation"
    if values[name] == AUTO:
        values[name] = default
        from_auto[name] = f"transformers' default for {spec.model_type}: {default}"
    elif values[name] == "sdpa" and default != "sdpa":
        raise KnobError(name, "sdpa", f"transformers has no sdpa attention for model_type {spec.model_type!r} "
                                      f"(its default is {default}); use eager")


def _merge(base, over):
    """Nested dicts: `over` wins, sections merge."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ------------------------------------------------------------------ resolved

def partition_numels(model):
    """Elements per parameter partition on one rank (ZeRO-3 partitions every
    parameter; persistent ones stay whole, which is the same count)."""
    return [t.numel for t in model.tensors()]


class ResolvedKnobs:
    """Knobs with every "auto" replaced for one model, checked for the
    combinations DeepSpeed 0.19.8 accepts and then crashes on."""

    def __init__(self, knobs, model, accelerator=None, check=True):
        self.knobs = knobs
        self.model = model
        self.accelerator = accelerator
        values = knobs.flat()
        self.from_auto = {}  # knob -> the rule an "auto" was resolved with
        if values["run.dtype"] == AUTO:  # first: the config alone says it
            values["run.dtype"], self.from_auto["run.dtype"] = model_dtype(
                getattr(model, "model", model).torch_dtype, _cuda(self))
        hidden_size = getattr(model, "model", model).hidden_size  # a ModelSpec, or sizing's view of one
        for name, (rule, apply) in TRAINER_AUTO_RULES.items():
            if values[name] == TRAINER_AUTO:
                values[name] = apply(hidden_size)
                self.from_auto[name] = f"HF Trainer: {rule} = {values[name]}"
        _resolve_attention(values, getattr(model, "model", model), self.from_auto)
        largest = max(partition_numels(model))
        for name in ("zero_optimization.offload_param.buffer_size", "zero_optimization.sub_group_size",
                     "zero_optimization.reduce_bucket_size"):
            if values[name] == AUTO:
                values[name] = largest
                self.from_auto[name] = f"memlab: the largest parameter partition = {largest}"
        plan = staging_plan(partition_numels(model), values["zero_optimization.sub_group_size"],
                            values["memascend.staging_elements"], values["aio.intra_op_parallelism"],
                            values["aio.block_size"])
        values["memascend.staging_elements"] = plan["bound"]
        self.staging_plan = plan
        for optimization in OPTIMIZATIONS:  # the environment a switch runs on (pinning backend, heap)
            if values.get(optimization.switch) == optimization.optimized:
                for name, value in optimization.environment:
                    knob = f"allocator.{name}"
                    given = values[knob]
                    optimization.check_environment(knob, name, None if given == SPEC_BY_NAME[knob].default else given)
                    values[knob] = _coerce(SPEC_BY_NAME[knob], value)
        self.values = values
        self.largest_partition = largest
        self.num_params = model.num_params
        found = self.refusals() if check else []
        if found:
            raise found[0]
        # what DeepSpeed may or may not survive on this model: warned about, then run
        self.risks = [risk for find in RISKS if (risk := find(self)) is not None]

    def refusals(self):
        """Every trap check this configuration fails, as KnobErrors (resolve raises the first)."""
        found = []
        for refuse in CHECKS:
            try:
                refuse(self)
            except KnobError as exc:
                found.append(exc)
        return found

    def __getitem__(self, name):
        return self.values[name]

    @property
    def engine(self):
        return self.knobs.engine

    @property
    def real_param_swapping(self):
        """Parameters actually go through NVMe while training (max_in_cpu trap)."""
        return (self["zero_optimization.offload_param.device"] == "nvme"
                and self["zero_optimization.offload_param.max_in_cpu"] < self.num_params)

    def to_dict(self):
        return {"engine": self.engine, **_nest(self.values)}

    def to_ds_config(self, swap_path=None):
        """The DeepSpeed config dict this run uses. `swap_path` is the run's own
        swap folder (required when anything is offloaded to NVMe)."""
        v = self.values
        zero = {"stage": 3}
        for name, value in v.items():
            if name.startswith("zero_optimization.") and name.count(".") == 1:
                zero[name.split(".", 1)[1]] = value
        for part in ("offload_param", "offload_optimizer"):
            prefix = f"zero_optimization.{part}."
            section = {n[len(prefix):]: value for n, value in v.items() if n.startswith(prefix)}
            if section["device"] == "nvme":
                if swap_path is None:
                    raise KnobError(prefix + "nvme_path", None, "a swap folder is needed for NVMe offload")
                section["nvme_path"] = os.fspath(swap_path)
            if part == "offload_param" and section["device"] == "cpu":
                for key in ("buffer_count", "buffer_size", "max_in_cpu"):
                    section.pop(key)
            if part == "offload_param" and section["device"] == "none":
                section = {"device": "none"}  # DeepSpeed reads no other offload_param key then
            zero[part] = section
        config = copy.deepcopy(self.knobs.passthrough)
        zero = _merge(config.pop("zero_optimization", {}), zero)
        optimizer = config.pop("optimizer", {"type": "Adam", "params": {}})
        config.update({
            "train_micro_batch_size_per_gpu": v["run.micro_batch"],
            "gradient_accumulation_steps": v["run.grad_accum"],
            "optimizer": {**optimizer, "params": {**optimizer["params"], "lr": v["run.lr"]}},
            "zero_optimization": zero,
            "aio": {n.split(".", 1)[1]: value for n, value in v.items() if n.startswith("aio.")},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        })
        scheduler = config.get("scheduler")
        if isinstance(scheduler, dict) and isinstance(scheduler.get("params"), dict):
            run_values = {"warmup_max_lr": v["run.lr"], "total_num_steps": v["run.steps"], **TRAINER_DEFAULTS}
            scheduler["params"] = {k: run_values.get(k, p) if p == AUTO else p for k, p in scheduler["params"].items()}
        if v["run.dtype"] == "bf16":
            config["bf16"] = {"enabled": True}
        elif v["run.dtype"] == "fp16":
            config["fp16"] = {"enabled": True, "initial_scale_power": 8}
        if v["data_types.grad_accum_dtype"] is not None:
            config["data_types"] = {"grad_accum_dtype": v["data_types.grad_accum_dtype"]}
        return config


# --- checks: each raises KnobError for one trap -----------------------------

def _adaptive_pool(r):
    return r.values.get("memascend.pool") == "adaptive"


def _check_param_buffer_size(r):
    if r["zero_optimization.offload_param.device"] != "nvme" or _adaptive_pool(r):
        return  # the adaptive pool sizes buffers by partition, not buffer_size
    size = r["zero_optimization.offload_param.buffer_size"]
    if size < r.largest_partition:
        raise KnobError("zero_optimization.offload_param.buffer_size", size,
                        f"smaller than the largest parameter partition ({r.largest_partition} elements of "
                        f"{r.model.largest_tensor.name}); DeepSpeed fails at init")


def swapped_tensors(r):
    """Parameters that really go through NVMe: at least max(1 MiB, aio.block_size) bytes."""
    element = DTYPE_BYTES[r["run.dtype"]]
    return [t for t in r.model.tensors() if swappable(t.numel, element, r["aio.block_size"])]


@dataclass(frozen=True)
class Risk:
    """A configuration DeepSpeed runs on some models and asserts on others, in a way memlab cannot yet
    decide from the model: Lab.run warns and runs it; if DeepSpeed then asserts with `crash` in its
    message, the run's error carries this explanation. `crash` None: DeepSpeed runs it, with a wrong
    result it does not report (a warning is all memlab can give)."""
    knob: str
    value: Any
    reason: str
    crash: Optional[str]  # a piece of DeepSpeed's assert message

    def __str__(self):
        return f"{self.knob}={self.value!r}: {self.reason}"

    def to_dict(self):
        return {"knob": self.knob, "value": self.value, "reason": self.reason, "crash": self.crash}


def _risk_live_parameters(r):
    live = r["zero_optimization.stage3_max_live_parameters"]
    if r.real_param_swapping and live > 0 and r["zero_optimization.stage3_prefetch_bucket_size"] > 0:
        # plain DeepSpeed, 3 steps: tiny-llama fails at step 2 (param 20, swapped in by read-ahead while the
        # last forward still holds it), small-llama and qwen-embed run, at 1e6 and 1e7 alike
        return Risk("zero_optimization.stage3_max_live_parameters", live,
                    "above 0 while parameters swap through NVMe with prefetching, DeepSpeed's read-ahead can swap "
                    "in a parameter the last forward still holds; on some models step 2 then fails with "
                    "'already assigned swap buffer' (set it to 0 to be sure)", "already assigned swap buffer")
    return None


def _risk_reuse_distance(r):
    distance = r["zero_optimization.stage3_max_reuse_distance"]
    if not r.real_param_swapping or distance == 0 or _adaptive_pool(r):
        return None
    count, swapped = r["zero_optimization.offload_param.buffer_count"], len(swapped_tensors(r))
    if count >= swapped + 2:
        return None
    # parameters kept for reuse hold their swap buffers; plain DeepSpeed ran small-llama (30 swapped
    # tensors) with 5 buffers at 1e3 and 1e7, and failed at 1e9
    return Risk("zero_optimization.stage3_max_reuse_distance", distance,
                f"above 0, kept parameters hold their swap buffers and {count} buffers cannot hold all "
                f"{swapped} swapped tensors; if too many are kept at once step 2 fails with "
                f"'Not enough buffers' (set it to 0, or give buffer_count >= {swapped + 2})", "Not enough")


def _risk_pipelined_buffers(r):
    count = r["zero_optimization.offload_optimizer.buffer_count"]
    pipelined = r["zero_optimization.offload_optimizer.pipeline_read"] or \
        r["zero_optimization.offload_optimizer.pipeline_write"]
    if r["zero_optimization.offload_optimizer.device"] == "nvme" and pipelined and count < 12:
        # each sub-group in flight holds Adam's 4 buffers, and up to three are (being written, in use, being
        # read); plain DeepSpeed ran tiny-llama with both pipelines and 8
        return Risk("zero_optimization.offload_optimizer.buffer_count", count,
                    "pipelined optimizer swapping keeps up to three sub-groups' 4 buffers each in flight; with "
                    "fewer than 12 the optimizer step can fail with 'ran out of swap buffers' or a bare assert",
                    "AssertionError")
    return None


def _risk_resume_swapped_params_cpu_optimizer(r):
    if r["run.resume_from"] and r["zero_optimization.offload_optimizer.device"] == "cpu" and r.real_param_swapping:
        # stage3 _rigid_load_state_dict copies each fp32 partition into its sub-group's fp16 flat buffer, which
        # swapped parameters do not have; measured with the stock engine (no memascend switch) on a Qwen2 shape
        return Risk("run.resume_from", r["run.resume_from"],
                    "DeepSpeed 0.19.8 cannot load a checkpoint with the optimizer on the CPU while parameters are "
                    "swapped to NVMe (stage3 _rigid_load_state_dict: 'NoneType' object has no attribute 'data'); "
                    "raise offload_param.max_in_cpu to hold every parameter, or keep the optimizer on NVMe",
                    "'NoneType' object has no attribute 'data'")
    return None


def _risk_stale_gradients(r):
    if r["zero_optimization.offload_optimizer.device"] != "nvme" or \
            r.values.get("memascend.optimizer_staging") == "bounded":
        return None
    tensors = r.model.tensors()
    stale = stale_gradient_reads([t.numel for t in tensors], r["zero_optimization.sub_group_size"],
                                 r["aio.block_size"], r["aio.intra_op_parallelism"])
    if not stale:
        return None
    return Risk("zero_optimization.offload_optimizer.device", "nvme",
                f"DeepSpeed 0.19.8 reads the swapped gradients of {len(stale)} of {len(tensors)} parameters "
                f"({tensors[stale[0]].name} first) with O_DIRECT into pinned memory that is not 512-byte "
                f"aligned (their offsets in their sub-groups); that read fails without an error and Adam steps "
                f"them on stale buffer contents, so the run trains, wrongly. memascend.optimizer_staging=bounded "
                f"reads them aligned", crash=None)


def _check_optimizer_buffers(r):
    if r["zero_optimization.offload_optimizer.device"] != "nvme":
        return
    count = r["zero_optimization.offload_optimizer.buffer_count"]
    if count < 4:
        raise KnobError("zero_optimization.offload_optimizer.buffer_count", count,
                        "Adam needs at least 4 optimizer swap buffers (3 states + the gradient)")


def _check_param_buffer_count(r):
    if not r.real_param_swapping or _adaptive_pool(r):
        return  # the adaptive pool grows on demand instead of asserting
    count = r["zero_optimization.offload_param.buffer_count"]
    needed = max(1, init_gather_group(swapped_tensors(r)))
    if count < needed:
        raise KnobError("zero_optimization.offload_param.buffer_count", count,
                        f"at least {needed} buffers are needed: transformers initializes a module's swapped "
                        f"parameters together (with its direct children's), else init fails with 'Not enough buffers'")


def init_gather_group(tensors):
    """Most swapped tensors gathered at once by transformers' initialize_weights_zero3:
    a module's own parameters plus those of its direct children (ds_rules.module_groups)."""
    return largest_module_group([t.name for t in tensors])


def _check_fast_init(r):
    if not (r.real_param_swapping and r["zero_optimization.offload_optimizer.fast_init"]):
        return
    if _adaptive_pool(r):
        raise KnobError("zero_optimization.offload_optimizer.fast_init", True,
                        "not supported with memascend.pool=adaptive (it stages init through whole fixed buffers)")
    numels = [t.numel for t in r.model.tensors()]
    largest = aligned_numel(sum(largest_sub_group(numels, r["zero_optimization.sub_group_size"])), FP32,
                            r["aio.intra_op_parallelism"])
    per_buffer = aligned_numel(r["zero_optimization.offload_param.buffer_size"], FP32,
                               r["aio.intra_op_parallelism"])
    if per_buffer < largest:
        raise KnobError("zero_optimization.offload_optimizer.fast_init", True,
                        f"needs offload_param.buffer_size >= the largest optimizer sub-group ({largest} elements); "
                        f"DeepSpeed asserts 'numel of fp16 buffers ... is too small'")


def _cuda(r):
    accelerator = getattr(r, "accelerator", None)
    return _cuda_present() if accelerator is None else accelerator == "cuda"


def _check_dtype(r):
    # DeepSpeed's CPU accelerator refuses fp16 ('Type fp16 is not supported on your device') unless oneDNN
    # has fp16 kernels for this CPU
    if r["run.dtype"] == "fp16" and not _cuda(r) and not _cpu_fp16_supported():
        raise KnobError("run.dtype", "fp16", "fp16 training needs a GPU or a CPU with AVX512-FP16 or AMX-FP16 "
                        "(this one has neither); on the CPU accelerator use fp32 or bf16")


def _check_checkpoints(r):
    if r["run.save_checkpoint_at"] > r["run.steps"]:
        raise KnobError("run.save_checkpoint_at", r["run.save_checkpoint_at"],
                        f"after the last step: run.steps is {r['run.steps']}")
    folder = r["run.resume_from"]
    if folder is not None and not os.path.isfile(os.path.join(folder, "latest")):
        raise KnobError("run.resume_from", folder, "not a DeepSpeed checkpoint folder (it has no 'latest' file)")


def _check_gds(r):
    if r["aio.use_gds"] and not _cuda(r):
        raise KnobError("aio.use_gds", True, "GPUDirect Storage needs a CUDA GPU")


# Checks of DeepSpeed's own knobs, then those each optimization adds (its record's).
CHECKS = [_check_param_buffer_size, _check_optimizer_buffers, _check_param_buffer_count, _check_fast_init,
          _check_dtype, _check_gds, _check_checkpoints] + [check for o in OPTIMIZATIONS for check in o.checks]
RISKS = [_risk_live_parameters, _risk_reuse_distance, _risk_pipelined_buffers,
         _risk_resume_swapped_params_cpu_optimizer, _risk_stale_gradients]

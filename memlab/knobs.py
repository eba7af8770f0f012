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
from dataclasses import dataclass
from typing import Any, Optional, Tuple

from .sizing import aligned_numel, largest_sub_group, staging_plan, swappable


class KnobError(ValueError):
    """A knob value memlab refuses, with a one-line message: knob, value, reason."""

    def __init__(self, knob, value, reason):
        self.knob, self.value, self.reason = knob, value, reason
        shown = knob if isinstance(knob, str) and knob.isprintable() else repr(knob)
        super().__init__(f"{shown}={value!r}: {' '.join(str(reason).split())}")


AUTO = "auto"
DEVICES = ("nvme", "cpu")
DTYPES = ("fp32", "bf16", "fp16")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


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
# behaviour memlab exists to measure or crashes (DEEPSPEED_HOST_MEMORY.md,
# "traps"); those carry `ds_default`.
SPECS = [
    # --- zero_optimization.offload_param
    _k("zero_optimization.offload_param.device", "nvme", "choice", "where parameters are offloaded", choices=DEVICES),
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
    _k("run.dtype", "fp32", "choice", "training dtype", choices=DTYPES),
    _k("run.steps", 3, "int", "optimizer steps", minimum=1),
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
    _k("run.telemetry", True, "bool", "probes and sampler on (off only to measure their overhead)"),
    _k("run.sample_hz", 13.0, "float", "sampler frequency", minimum=1.0, maximum=50.0),
    # --- memascend settings that are not on/off switches
    _k("memascend.staging_elements", AUTO, "int",
       "staging bound of memascend.optimizer_staging=bounded, in elements; auto = the largest sub-group of more "
       "than one parameter", minimum=1024, auto=True),
    _k("memascend.storage_device", None, "path",
       "raw block device for memascend.storage=direct (used only when named; its contents are overwritten)",
       optional=True),
    # --- allocator environment (memlab)
    _k("allocator.DS_PIN_MEMORY_BACKEND", "torch", "choice", "DeepSpeed's pinning backend",
       choices=("torch", "native")),
    _k("allocator.MALLOC_ARENA_MAX", None, "int", "glibc malloc arenas", minimum=1, optional=True),
    _k("allocator.MALLOC_TRIM_THRESHOLD_", None, "int", "glibc trim threshold (bytes)", minimum=0, optional=True),
    _k("allocator.malloc_trim", "never", "choice", "call malloc_trim(0) explicitly", choices=("never", "each_step")),
]
SPEC_BY_NAME = {s.name: s for s in SPECS}

# memascend.* switches: name -> (DeepSpeed's behaviour, the optimized value).
# One module each in memlab/engine/memascend/; engine="memascend" turns all on.
MEMASCEND_SWITCHES = {
    "memascend.pool": ("fixed", "adaptive"),
    "memascend.pinning": ("torch", "exact"),
    "memascend.grad_checks": ("stock", "fused"),
    "memascend.optimizer_staging": ("stock", "bounded"),
    "memascend.storage": ("files", "direct"),
}
MEMASCEND_DOCS = {
    "memascend.pool": "parameter swap buffers sized by the partitions that use them, grown on demand",
    "memascend.pinning": "pinned buffers take exactly their bytes rounded to the page (DeepSpeed's native backend)",
    "memascend.grad_checks": "overflow check and gradient norm in bounded slices, no buffer-sized temporaries",
    "memascend.optimizer_staging": "a one-parameter sub-group larger than the staging bound (the embedding) is "
                                   "stepped slice by slice through bounded buffers; no full-size first-step copy",
    "memascend.storage": "all swapped tensors at fixed offsets in one preallocated region instead of a file each",
}
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
        from .budget import parse_bytes

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
                zero_extra = {}
                for name, v in _flatten(value, "zero_optimization.").items():
                    short = name[len("zero_optimization."):]
                    if short in ("stage", "offload_param.nvme_path", "offload_optimizer.nvme_path"):
                        continue  # memlab creates each run's own swap folder
                    if name not in SPEC_BY_NAME and short in DS_ZERO_UNMODELED:
                        zero_extra[short] = v
                    else:
                        values[name] = v
                if zero_extra:
                    passthrough["zero_optimization"] = _nest(zero_extra)
            elif key in ("aio", "data_types"):
                values.update(_flatten(value, key + "."))
            elif key == "train_micro_batch_size_per_gpu":
                values["run.micro_batch"] = value
            elif key in ("bf16", "fp16"):
                if value.get("enabled"):
                    values["run.dtype"] = key
            elif key == "optimizer":
                optimizer = _optimizer_section(value, source)
                if "lr" in optimizer["params"]:
                    values["run.lr"] = optimizer["params"].pop("lr")
                passthrough["optimizer"] = optimizer
            elif key in ("train_batch_size", "gradient_accumulation_steps"):
                continue  # derived from run.micro_batch on one rank
            else:
                passthrough[key] = value
        return cls(values, engine=engine, passthrough=passthrough)

    def resolve(self, model, accelerator=None):
        """Validate against a model and replace "auto"; returns ResolvedKnobs.
        `accelerator` ("cpu" | "cuda") is the machine the checks assume; None
        means this one (the what-if estimator sizes other machines)."""
        return ResolvedKnobs(self, model, accelerator)


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

    def __init__(self, knobs, model, accelerator=None):
        self.knobs = knobs
        self.model = model
        self.accelerator = accelerator
        values = knobs.flat()
        largest = max(partition_numels(model))
        for name in ("zero_optimization.offload_param.buffer_size", "zero_optimization.sub_group_size",
                     "zero_optimization.reduce_bucket_size"):
            if values[name] == AUTO:
                values[name] = largest
        plan = staging_plan(partition_numels(model), values["zero_optimization.sub_group_size"],
                            values["memascend.staging_elements"])
        if values["memascend.staging_elements"] != AUTO and plan["bound"] < plan["largest_multi_group"]:
            raise KnobError("memascend.staging_elements", values["memascend.staging_elements"],
                            f"smaller than the largest sub-group of several parameters ({plan['largest_multi_group']} "
                            f"elements), which cannot be streamed; raise it or lower sub_group_size")
        values["memascend.staging_elements"] = plan["bound"]
        self.staging_plan = plan
        if values.get("memascend.pinning") == "exact":
            values["allocator.DS_PIN_MEMORY_BACKEND"] = "native"  # the backend exact pinning runs on
        self.values = values
        self.largest_partition = largest
        self.num_params = model.num_params
        for check in CHECKS:
            check(self)

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
            zero[part] = section
        config = copy.deepcopy(self.knobs.passthrough)
        zero = _merge(config.pop("zero_optimization", {}), zero)
        optimizer = config.pop("optimizer", {"type": "Adam", "params": {}})
        config.update({
            "train_micro_batch_size_per_gpu": v["run.micro_batch"],
            "gradient_accumulation_steps": 1,
            "optimizer": {**optimizer, "params": {**optimizer["params"], "lr": v["run.lr"]}},
            "zero_optimization": zero,
            "aio": {n.split(".", 1)[1]: value for n, value in v.items() if n.startswith("aio.")},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        })
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


def _check_live_parameters(r):
    live = r["zero_optimization.stage3_max_live_parameters"]
    prefetch = r["zero_optimization.stage3_prefetch_bucket_size"]
    if r.real_param_swapping and live > 0 and prefetch > 0:
        # Read-ahead puts the parameter used last in forward and first in backward
        # into one swap-in twice (measured: ids=[20, 20]).
        raise KnobError("zero_optimization.stage3_max_live_parameters", live,
                        "must be 0 when parameters swap through NVMe and stage3_prefetch_bucket_size > 0; "
                        "otherwise step 2 fails with 'param N already assigned swap buffer'")


def _check_reuse_distance(r):
    distance = r["zero_optimization.stage3_max_reuse_distance"]
    if not r.real_param_swapping or distance == 0:
        return
    # Kept partitions hold their buffers: it runs only when every swapped
    # tensor can keep one (measured: 30 swapped tensors fail at 5 buffers, run at 32).
    needed = len(swapped_tensors(r)) + 2
    count = r["zero_optimization.offload_param.buffer_count"]
    if count < needed and not _adaptive_pool(r):
        raise KnobError("zero_optimization.stage3_max_reuse_distance", distance,
                        f"> 0 with parameters swapping through NVMe needs offload_param.buffer_count >= {needed} "
                        f"(the {needed - 2} swapped tensors + 2), else step 2 fails with 'Not enough buffers'; "
                        f"set it to 0")


def _check_optimizer_buffers(r):
    if r["zero_optimization.offload_optimizer.device"] != "nvme":
        return
    count = r["zero_optimization.offload_optimizer.buffer_count"]
    pipelined = r["zero_optimization.offload_optimizer.pipeline_read"] or \
        r["zero_optimization.offload_optimizer.pipeline_write"]
    if pipelined and count < 12:
        raise KnobError("zero_optimization.offload_optimizer.buffer_count", count,
                        "pipelined optimizer swapping (pipeline_read/pipeline_write) needs at least 12 buffers "
                        "(3 x Adam's 4 tensors)")
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
    a module's own parameters plus those of its direct children."""
    groups = {}
    for t in tensors:
        module = t.name.rsplit(".", 1)[0]
        parent = module.rsplit(".", 1)[0] if "." in module else ""
        for group in {module, parent}:
            groups[group] = groups.get(group, 0) + 1
    return max(groups.values(), default=0)


def _check_fast_init(r):
    if not (r.real_param_swapping and r["zero_optimization.offload_optimizer.fast_init"]):
        return
    if _adaptive_pool(r):
        raise KnobError("zero_optimization.offload_optimizer.fast_init", True,
                        "not supported with memascend.pool=adaptive (it stages init through whole fixed buffers)")
    numels = [t.numel for t in r.model.tensors()]
    element = 4
    largest = aligned_numel(sum(largest_sub_group(numels, r["zero_optimization.sub_group_size"])), element,
                            r["aio.intra_op_parallelism"])
    per_buffer = aligned_numel(r["zero_optimization.offload_param.buffer_size"], element,
                               r["aio.intra_op_parallelism"])
    if per_buffer < largest:
        raise KnobError("zero_optimization.offload_optimizer.fast_init", True,
                        f"needs offload_param.buffer_size >= the largest optimizer sub-group ({largest} elements); "
                        f"DeepSpeed asserts 'numel of fp16 buffers ... is too small'")


def _cuda(r):
    accelerator = getattr(r, "accelerator", None)
    return _cuda_present() if accelerator is None else accelerator == "cuda"


def _check_dtype(r):
    if r["run.dtype"] == "fp16" and not _cuda(r):
        raise KnobError("run.dtype", "fp16", "fp16 training needs a GPU; on the CPU accelerator use fp32 or bf16")


def _cuda_present():
    # Checked without importing torch: the NVIDIA driver exposes this file.
    return os.path.exists("/proc/driver/nvidia/version")


def _check_gds(r):
    if r["aio.use_gds"] and not _cuda(r):
        raise KnobError("aio.use_gds", True, "GPUDirect Storage needs a CUDA GPU")


def _check_bounded_staging(r):
    if r.values.get("memascend.optimizer_staging") != "bounded":
        return
    if r["zero_optimization.offload_optimizer.pipeline_read"] or r["zero_optimization.offload_optimizer.pipeline_write"]:
        raise KnobError("memascend.optimizer_staging", "bounded",
                        "not supported with offload_optimizer.pipeline_read/pipeline_write")
    if r["zero_optimization.offload_optimizer.ratio"] != 1.0:
        raise KnobError("memascend.optimizer_staging", "bounded", "needs offload_optimizer.ratio 1.0")


def _check_storage_device(r):
    device = r.values.get("memascend.storage_device")
    if device and r.values.get("memascend.storage") != "direct":
        raise KnobError("memascend.storage_device", device, "needs memascend.storage=direct")


def _check_adaptive_gds(r):
    if _adaptive_pool(r) and r["aio.use_gds"]:
        raise KnobError("memascend.pool", "adaptive", "not supported with aio.use_gds (GDS keeps the pool on the GPU)")


CHECKS = [_check_param_buffer_size, _check_live_parameters, _check_reuse_distance, _check_optimizer_buffers, _check_param_buffer_count,
          _check_fast_init, _check_dtype, _check_gds, _check_adaptive_gds, _check_bounded_staging,
          _check_storage_device]

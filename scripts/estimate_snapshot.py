"""A snapshot of the what-if estimator over a broad grid of configurations, to
prove that a refactoring of memlab.sizing changes no number.

    .venv/bin/python scripts/estimate_snapshot.py write /tmp/estimate_before.json
    ... refactor ...
    .venv/bin/python scripts/estimate_snapshot.py write /tmp/estimate_after.json
    .venv/bin/python scripts/estimate_snapshot.py compare /tmp/estimate_before.json /tmp/estimate_after.json

Each entry is `estimate(model, knobs, hardware)` as `to_dict()` plus what
to_dict leaves out (`probe_hidden`, `as_probed()`, `table()`, `repr`), or the
exception it raised (type and message: configurations DeepSpeed rejects raise
KnobError, and that is part of the behaviour too); `fit(...)` results likewise.
The grid: every preset and a tied-embedding Qwen2, both engines, each
memascend.* switch alone, offload devices, buffer counts and sizes,
sub_group_size, max_in_cpu, pipelined optimizer swapping, run shapes, gradient
checkpointing (and DeepSpeed's cpu_checkpointing), dtypes, one and several
ranks, CPU and CUDA hardware, the glibc mmap threshold, and the rest of the
knobs the estimate reads. `memlab` is imported from sys.path, so PYTHONPATH
can point it at another tree (an old one, to snapshot the code before a change).
"""
import json
import sys
import time

from memlab.knobs import MEMASCEND_SWITCHES, Knobs
from memlab.models import ModelSpec
from memlab.sizing import Hardware, estimate, fit

GiB = 1 << 30
P = "zero_optimization.offload_param."
O = "zero_optimization.offload_optimizer."
Z = "zero_optimization."
TIED = {"model_type": "qwen2", "vocab_size": 65536, "hidden_size": 1024, "intermediate_size": 2816,
        "num_hidden_layers": 2, "num_attention_heads": 16, "num_key_value_heads": 4,
        "tie_word_embeddings": True, "max_position_embeddings": 2048}
CPU_CKPT = {"activation_checkpointing": {"cpu_checkpointing": True}}

HARDWARE = {
    "cpu": lambda: Hardware(),
    "cpu-ram": lambda: Hardware(ram_bytes=128 * GiB),
    "cpu-2ranks": lambda: Hardware(ram_bytes=128 * GiB, ranks_per_node=2),
    "cuda": lambda: Hardware(gpus=1, gpu_bytes=80 * GiB, ram_bytes=128 * GiB, accelerator="cuda"),
    "cuda-2ranks": lambda: Hardware(gpus=2, gpu_bytes=80 * GiB, ram_bytes=256 * GiB, ranks_per_node=2,
                                    accelerator="cuda"),
    "cuda-2nodes": lambda: Hardware.cuda_node(gpus=2, gpu_bytes=40 * GiB, ram_bytes=512 * GiB, nodes=2),
}


def _largest(spec):
    return max(t.numel for t in spec.tensors())


# name -> knobs (a dict, or a function of the ModelSpec giving one); ("passthrough", dict) pairs as tuples
CORE = {
    "base": {},
    "gc": {"run.gradient_checkpointing": True, "run.seq_len": 1024},
    "long": {"run.micro_batch": 2, "run.seq_len": 8192},
    "mmap1M": {"allocator.MALLOC_MMAP_THRESHOLD_": 1 << 20},
    "params-cpu": {P + "device": "cpu"},
    "opt-cpu": {O + "device": "cpu"},
    "both-cpu": {P + "device": "cpu", O + "device": "cpu"},
    "params-none": {P + "device": "none"},
    "opt-none": {O + "device": "none"},
    "params-cpu-opt-nvme-gc": {P + "device": "cpu", "run.gradient_checkpointing": True, "run.seq_len": 512},
    "max-in-cpu-all": {P + "max_in_cpu": 10 ** 12},
    "sub-group-1e7": {Z + "sub_group_size": 10 ** 7},
    "pipelined": {O + "pipeline_read": True, O + "pipeline_write": True, O + "buffer_count": 12},
    "cpu-ckpt": ({"run.gradient_checkpointing": True, "run.seq_len": 2048}, CPU_CKPT),
    # memascend refuses bounded staging without NVMe optimizer state: on that engine, the other four switches
    "opt-cpu-unbounded": {O + "device": "cpu", "memascend.optimizer_staging": "stock"},
}
EXTRA = {
    "param-buffers-3": {P + "buffer_count": 3},
    "param-buffers-8": {P + "buffer_count": 8},
    "param-buffers-1": {P + "buffer_count": 1},
    "param-buffer-size-x2": lambda s: {P + "buffer_size": 2 * _largest(s)},
    "param-buffer-size-odd": lambda s: {P + "buffer_size": _largest(s) + 12345},
    "param-buffer-size-small": {P + "buffer_size": 1 << 20},
    "opt-buffers-6": {O + "buffer_count": 6},
    "opt-buffers-3": {O + "buffer_count": 3},
    "sub-group-1e6": {Z + "sub_group_size": 10 ** 6},
    "sub-group-1e8": {Z + "sub_group_size": 10 ** 8},
    "sub-group-1e9": {Z + "sub_group_size": 10 ** 9},
    "sub-group-largest": lambda s: {Z + "sub_group_size": _largest(s)},
    "max-in-cpu-1e7": {P + "max_in_cpu": 10 ** 7},
    "max-in-cpu-1e9": {P + "max_in_cpu": 10 ** 9},
    "max-in-cpu-1e9-sg1e7": {P + "max_in_cpu": 10 ** 9, Z + "sub_group_size": 10 ** 7},
    "pipeline-read": {O + "pipeline_read": True, O + "buffer_count": 12},
    "pipeline-write": {O + "pipeline_write": True, O + "buffer_count": 16},
    "pipeline-too-few": {O + "pipeline_read": True},
    "mb4-s1024": {"run.micro_batch": 4, "run.seq_len": 1024},
    "mb1-s32768": {"run.seq_len": 32768},
    "s2": {"run.seq_len": 2},
    "gc-mb8-s4096": {"run.gradient_checkpointing": True, "run.micro_batch": 8, "run.seq_len": 4096},
    "cpu-ckpt-no-gc": ({"run.seq_len": 512}, CPU_CKPT),
    "mmap0": {"allocator.MALLOC_MMAP_THRESHOLD_": 0},
    "mmap128k-gc": {"allocator.MALLOC_MMAP_THRESHOLD_": 128 << 10, "run.gradient_checkpointing": True},
    "mmap32M": {"allocator.MALLOC_MMAP_THRESHOLD_": 32 << 20},
    "no-pin-params": {P + "pin_memory": False},
    "no-pin-opt": {O + "pin_memory": False},
    "native-pinning": {"allocator.DS_PIN_MEMORY_BACKEND": "native"},
    "ratio-0.5": {O + "ratio": 0.5, Z + "sub_group_size": 10 ** 7},
    "ratio-0": {O + "ratio": 0.0},
    "no-contiguous": {Z + "contiguous_gradients": False},
    "bucket-1e6": {Z + "reduce_bucket_size": 10 ** 6},
    "bucket-5e8": {Z + "reduce_bucket_size": 5 * 10 ** 8},
    "grad-accum-fp32": {"data_types.grad_accum_dtype": "fp32"},
    "persistence-0": {Z + "stage3_param_persistence_threshold": 0},
    "persistence-1e7": {Z + "stage3_param_persistence_threshold": 10 ** 7},
    "reuse-distance": {Z + "stage3_max_reuse_distance": 10 ** 9},
    "reuse-distance-buffers": {Z + "stage3_max_reuse_distance": 10 ** 9, P + "buffer_count": 2000},
    "live-params": {Z + "stage3_max_live_parameters": 10 ** 8},
    "live-params-no-prefetch": {Z + "stage3_max_live_parameters": 10 ** 8, Z + "stage3_prefetch_bucket_size": 0},
    "gds": {"aio.use_gds": True},
    "gds-params-cpu": {"aio.use_gds": True, P + "device": "cpu"},
    "io2": {"aio.intra_op_parallelism": 2},
    "io4-block2M": {"aio.intra_op_parallelism": 4, "aio.block_size": 2 << 20},
    "block8M": {"aio.block_size": 8 << 20},
    "staging-big": {"memascend.staging_elements": 1 << 30},
    "staging-1024": {"memascend.staging_elements": 1024},
    "staging-sg1e7": {"memascend.staging_elements": 10 ** 8, Z + "sub_group_size": 10 ** 7},
    "fast-init": {O + "fast_init": True},
    "fast-init-big-buffers": lambda s: {O + "fast_init": True, P + "buffer_size": 4 * _largest(s),
                                        Z + "sub_group_size": _largest(s)},
    "gds-fixed-pool": {"aio.use_gds": True, "memascend.pool": "fixed"},
    "fast-init-fixed-pool": lambda s: {O + "fast_init": True, P + "buffer_size": 4 * _largest(s),
                                       Z + "sub_group_size": _largest(s), "memascend.pool": "fixed"},
    "ratio-0.5-unbounded": {O + "ratio": 0.5, Z + "sub_group_size": 10 ** 7, "memascend.optimizer_staging": "stock"},
    "mixed": {P + "buffer_count": 7, O + "buffer_count": 5, Z + "sub_group_size": 10 ** 7,
              "aio.block_size": 2 << 20, "run.micro_batch": 2, "run.seq_len": 256},
}
for _name, (_stock, _optimized) in MEMASCEND_SWITCHES.items():
    EXTRA[f"switch:{_name}"] = {_name: _optimized}
    CORE[f"switch:{_name}"] = {_name: _optimized}


def _record(fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - what raised is part of the behaviour
        return {"raises": type(exc).__name__, "message": str(exc)}


def _estimate_entry(est):
    out = est.to_dict()
    out["probe_hidden"] = dict(est.probe_hidden)
    out["as_probed"] = est.as_probed()
    out["probed_peak_engine_host_bytes"] = est.probed_peak_engine_host_bytes
    out["table"] = est.table()
    out["repr"] = repr(est)
    return out


def _knobs(spec, variant, engine, dtype):
    values, passthrough = (variant if isinstance(variant, tuple) else (variant, None))
    values = dict(values(spec) if callable(values) else values)
    values["run.dtype"] = dtype
    if engine == "memascend":  # a switch named in a variant is turned back off: every switch but that one
        values = {k: (MEMASCEND_SWITCHES[k][0] if k in MEMASCEND_SWITCHES else v) for k, v in values.items()}
    return Knobs(values, engine=engine, passthrough=passthrough)  # deepspeed with a switch on: "custom"


def _one(spec, variant, engine, dtype, hardware):
    def run():
        return _estimate_entry(estimate(spec, _knobs(spec, variant, engine, dtype), HARDWARE[hardware]()))
    return _record(run)


def _fit_entry(report):
    out = report.to_dict()
    out["table"] = report.table()
    for engine, result in report.results.items():
        out["results"][engine]["estimate"] = None if result.estimate is None else _estimate_entry(result.estimate)
        out["results"][engine]["failing"] = None if result.failing is None else _estimate_entry(result.failing)
    return out


FITS = {
    "tiny seq_len 6GiB": lambda: fit("tiny-llama", {}, Hardware(ram_bytes=6 * GiB), target="seq_len"),
    "small seq_len 4GiB bf16": lambda: fit("small-llama", {"run.dtype": "bf16"}, Hardware(), target="seq_len",
                                           ram_bytes=4 * GiB),
    "small micro_batch 8GiB gc": lambda: fit("small-llama", {"run.gradient_checkpointing": True, "run.seq_len": 512},
                                             Hardware(ram_bytes=8 * GiB), target="micro_batch"),
    "7b seq_len cuda gpu budget": lambda: fit("qwen2.5-7b", {"run.dtype": "bf16", "run.gradient_checkpointing": True},
                                              Hardware(gpus=1, gpu_bytes=24 * GiB, ram_bytes=256 * GiB,
                                                       accelerator="cuda"), target="seq_len"),
    "70b seq_len 8 GPUs": lambda: fit("llama-3.1-70b", {"run.dtype": "bf16", "run.gradient_checkpointing": True},
                                      Hardware(ram_bytes=1024 * GiB, gpus=8, gpu_bytes=80 * GiB, ranks_per_node=8,
                                               accelerator="cuda"), target="seq_len", ram_bytes=512 * GiB,
                                      multiple_of=1024),
    "8b micro_batch min/max": lambda: fit("llama-3.1-8b", {"run.dtype": "bf16", "run.seq_len": 2048},
                                          Hardware(ram_bytes=64 * GiB), target="micro_batch", minimum=2, maximum=64),
    "nothing fits": lambda: fit("qwen2.5-72b", {}, Hardware(ram_bytes=1 * GiB), target="seq_len"),
    "search range": lambda: fit("tiny-llama", {}, Hardware(ram_bytes=10 ** 6 * GiB), target="micro_batch",
                                maximum=64),
    "models 64GiB": lambda: fit(models=ModelSpec.presets() + [TIED], knobs={"run.dtype": "bf16"},
                                hardware=Hardware(ram_bytes=64 * GiB), target="model"),
    "models cuda": lambda: fit(models=["qwen2.5-0.5b", "qwen2.5-7b", "qwen2.5-14b", "llama-3.1-70b"],
                               knobs={"run.dtype": "bf16", P + "buffer_size": 1 << 20},
                               hardware=Hardware(gpus=1, gpu_bytes=40 * GiB, ram_bytes=96 * GiB, accelerator="cuda"),
                               target="model"),
    "bad target": lambda: fit("tiny-llama", {}, Hardware(ram_bytes=GiB), target="steps"),
    "no budget": lambda: fit("tiny-llama", {}, Hardware(), target="seq_len"),
}


def snapshot():
    out = {}
    models = {name: ModelSpec.resolve(name) for name in ModelSpec.presets()}
    models["tied-qwen2"] = ModelSpec.resolve(TIED)
    for model, spec in models.items():
        for engine in ("deepspeed", "memascend"):
            for hardware in HARDWARE:
                for dtype in ("fp32", "bf16", "fp16"):
                    for name, variant in CORE.items():
                        out[f"estimate|{model}|{engine}|{hardware}|{dtype}|{name}"] = _one(
                            spec, variant, engine, dtype, hardware)
            for hardware in ("cpu-ram", "cuda-2ranks"):
                for name, variant in EXTRA.items():
                    out[f"estimate|{model}|{engine}|{hardware}|bf16|{name}"] = _one(
                        spec, variant, engine, "bf16", hardware)
            for hardware in ("cpu", "cuda"):
                for name, variant in EXTRA.items():
                    out[f"estimate|{model}|{engine}|{hardware}|fp32|{name}"] = _one(
                        spec, variant, engine, "fp32", hardware)
    # the other ways of passing knobs: a dict, None, the engine keyword, a bad hardware
    for engine in (None, "deepspeed", "memascend"):
        out[f"call|dict|{engine}"] = _record(lambda: _estimate_entry(
            estimate("small-llama", {"run.seq_len": 256}, Hardware(ram_bytes=8 * GiB), engine=engine)))
        out[f"call|none|{engine}"] = _record(lambda: _estimate_entry(estimate("tiny-llama", engine=engine)))
        out[f"call|knobs|{engine}"] = _record(lambda: _estimate_entry(
            estimate("tiny-llama", Knobs({"run.dtype": "bf16"}, engine="memascend"), HARDWARE["cuda"](),
                     engine=engine)))
    out["call|bad-hardware"] = _record(lambda: _estimate_entry(estimate("tiny-llama", {}, {"gpus": 1})))
    out["call|config-dict"] = _record(lambda: _estimate_entry(estimate(TIED, {}, HARDWARE["cpu-2ranks"]())))
    for name, call in FITS.items():
        out[f"fit|{name}"] = _record(lambda: _fit_entry(call()))
    return out


def compare(before, after):
    """Lines saying how two snapshots differ (none: identical)."""
    lines = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            lines.append(f"missing after: {key}")
        elif key not in before:
            lines.append(f"new after: {key}")
        elif before[key] != after[key]:
            a, b = before[key], after[key]
            fields = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)) if isinstance(a, dict) and \
                isinstance(b, dict) else ["(value)"]
            lines.append(f"differs: {key}: {', '.join(fields[:8])}")
    return lines


def main(argv):
    if len(argv) == 3 and argv[1] == "write":
        start = time.perf_counter()
        data = snapshot()
        with open(argv[2], "w") as f:
            json.dump(data, f, sort_keys=True, separators=(",", ":"))
        raised = sum(1 for v in data.values() if isinstance(v, dict) and "raises" in v)
        print(f"{len(data)} configurations ({len(data) - raised} estimated, {raised} raised) in "
              f"{time.perf_counter() - start:.0f} s -> {argv[2]}")
        return 0
    if len(argv) == 4 and argv[1] == "compare":
        with open(argv[2]) as f:
            before = json.load(f)
        with open(argv[3]) as f:
            after = json.load(f)
        lines = compare(before, after)
        for line in lines[:50]:
            print(line)
        print(f"{len(before)} configurations before, {len(after)} after: "
              f"{'IDENTICAL' if not lines and before == after else f'{len(lines)} differ'}")
        return 0 if not lines and before == after else 1
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

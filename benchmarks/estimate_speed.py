"""How long one what-if estimate takes (the sizing panel re-estimates on every
slider move, so it must stay well under 20 ms for a 70B model).

    .venv/bin/python benchmarks/estimate_speed.py

Times `memlab.estimate` for llama-3.1-70b (and smaller shapes) with DeepSpeed's
engine and MemAscend's, on the CPU accelerator and on an 8-GPU CUDA node;
prints a table and writes benchmarks/out/estimate_speed.md. Each figure is the
median of REPEATS timed calls after one warm-up call (the model's shapes are
derived afresh on every call: nothing is cached between estimates).
"""
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memlab import Knobs, ModelSpec, shapes  # noqa: E402
from memlab.sizing import GiB, Hardware, estimate, fit  # noqa: E402

REPEATS = 50
LIMIT_MS = 20.0
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "estimate_speed.md")
HARDWARE = {
    "cpu, 1 rank": Hardware(ram_bytes=256 * GiB),
    "cuda, 8 GPUs": Hardware(ram_bytes=1024 * GiB, gpus=8, gpu_bytes=80 * GiB, ranks_per_node=8, accelerator="cuda"),
}
MODELS = ("llama-3.1-70b", "qwen2.5-72b", "qwen2.5-7b")


def timed(fn, repeats=REPEATS):
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), max(samples)


def first_calls(models=("tiny-llama", "llama-3.1-70b")):
    """Seconds of the first estimate of each model in a fresh process state: no shape helper running,
    an empty disk cache (so the helper starts, imports torch and transformers, and derives the
    shapes and activations), then the same estimate again from the disk cache alone."""
    out = []
    saved = os.environ.get("MEMLAB_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="memlab-cache-") as cache:
        os.environ["MEMLAB_CACHE_DIR"] = cache
        try:
            for model in models:
                knobs = {"run.dtype": "bf16", "run.seq_len": 8192}
                shapes.release()  # the helper stops: a cold start
                shapes.forget()
                start = time.perf_counter()
                estimate(model, knobs)
                cold = time.perf_counter() - start
                shapes.release()
                shapes.forget()  # as a new process: only the disk cache is left
                start = time.perf_counter()
                estimate(model, knobs)
                out.append((model, cold, time.perf_counter() - start))
        finally:
            shapes.release()
            if saved is None:
                os.environ.pop("MEMLAB_CACHE_DIR", None)
            else:
                os.environ["MEMLAB_CACHE_DIR"] = saved
    return out


def main():
    firsts = first_calls()
    rows = []
    for model in MODELS:
        spec = ModelSpec.resolve(model)  # a preset name resolves in microseconds; the estimate derives the shapes
        for hw_name, hw in HARDWARE.items():
            for engine in ("deepspeed", "memascend"):
                knobs = Knobs({"run.dtype": "bf16", "run.seq_len": 8192, "run.gradient_checkpointing": True},
                              engine=engine)
                median, worst = timed(lambda: estimate(spec, knobs, hw))
                rows.append((model, hw_name, engine, median, worst))
    fit_ms, _ = timed(lambda: fit("llama-3.1-70b", {"run.dtype": "bf16", "run.gradient_checkpointing": True},
                                  HARDWARE["cuda, 8 GPUs"], target="seq_len", ram_bytes=512 * GiB, multiple_of=1024),
                      repeats=3)
    lines = ["| model | hardware | engine | median ms | worst ms |", "|---|---|---|---|---|"]
    lines += [f"| {m} | {h} | {e} | {med:.2f} | {w:.2f} |" for m, h, e, med, w in rows]
    seventy = [med for m, _, _, med, _ in rows if m == "llama-3.1-70b"]
    verdict = "PASS" if max(seventy) < LIMIT_MS else "FAIL"
    text = "\n".join([
        "# What-if estimate speed",
        "",
        f"`.venv/bin/python benchmarks/estimate_speed.py` on {platform.node()} ({os.cpu_count()} cores, "
        f"Python {platform.python_version()}), {REPEATS} timed calls each after a warm-up, "
        "bf16, 8192 tokens, gradient checkpointing.",
        "",
        *lines,
        "",
        f"llama-3.1-70b: slowest median {max(seventy):.2f} ms per estimate (limit {LIMIT_MS:.0f} ms): {verdict}.",
        f"`fit` (largest seq_len for llama-3.1-70b on the 8-GPU node, both engines): {fit_ms:.0f} ms.",
        "",
        "First estimate of a model (no helper running, empty disk cache: the helper starts and derives the",
        "model's shapes and activations), then the same from the disk cache in a new process state:",
        "",
        "| model | first call s | from the disk cache s |",
        "|---|---|---|",
        *[f"| {m} | {cold:.1f} | {warm:.3f} |" for m, cold, warm in firsts],
        "",
    ])
    print(text)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write(text)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

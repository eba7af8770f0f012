"""Helpers the test files share: waiting on events, finding a run's processes,
the repository's folders, running the GPU check's scripts."""
import glob
import json
import os
import subprocess
import sys
import time

import psutil

# How long a test waits for something the machine is bound to do. Never part of
# what is asserted: a busy machine only makes the wait longer.
PATIENCE = 600


def wait_for(predicate, timeout=PATIENCE, interval=0.05):
    """Poll until `predicate()` is true; False if `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def events_of(run_dir, name="events.jsonl"):
    """The complete event lines a run folder holds so far."""
    try:
        with open(os.path.join(run_dir, name)) as f:
            lines = f.read().splitlines(keepends=True)
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.endswith("\n") and line.strip()]


def has_event(run_dir, kind, **fields):
    return any(e["kind"] == kind and all(e.get(k) == v for k, v in fields.items()) for e in events_of(run_dir))


def has_log(run_dir, text):
    return any(e["kind"] == "log" and text in e.get("message", "") for e in events_of(run_dir))


def processes_of(run_dir):
    """Every live process whose command line names the run folder (worker, ranks,
    launcher), or that memlab's watchdog started for it."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if run_dir in cmdline and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


# ------------------------------------------------------------------ the repository's folders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout: tests/ is one below it
SCRIPTS = os.path.join(ROOT, "scripts")
NOTEBOOKS = os.path.join(ROOT, "notebooks")


def notebook_paths():
    return sorted(glob.glob(os.path.join(NOTEBOOKS, "*.ipynb")))


def notebook_names():
    return [os.path.splitext(os.path.basename(p))[0] for p in notebook_paths()]


# ------------------------------------------------------------------ the GPU check's scripts

def run_script(argv, env=None, cwd=ROOT, timeout=120):
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


def gpu_compare(*args):
    """scripts/gpu_compare.py with these arguments; it must succeed."""
    done = run_script([sys.executable, os.path.join(SCRIPTS, "gpu_compare.py"), *map(str, args)])
    assert done.returncode == 0, done.stderr
    return done


def table_rows(markdown, heading):
    """First cells of the first table under a `## heading`."""
    section = markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows[1:]]  # past the header (the separator starts with |-)

# A Llama whose partitions are not I/O-aligned (hidden 1000): most parameters sit at offsets in their
# sub-group that are not 512-byte aligned in fp32, and partitions brought into RAM land at unaligned places
UNALIGNED = {"model_type": "llama", "vocab_size": 4096, "hidden_size": 1000, "intermediate_size": 1400,
             "num_hidden_layers": 2, "num_attention_heads": 10, "num_key_value_heads": 10,
             "max_position_embeddings": 256}

# The Hugging Face Trainer's ZeRO-3 NVMe example config, as its docs give it
HF_TRAINER_CONFIG = os.path.join(ROOT, "tests", "data", "hf_trainer_zero3_nvme.json")


# ------------------------------------------------------------------ model families

# Tiny configs of causal-LM families transformers builds (random weights, a few MiB): the families'
# own defaults for everything not set here. Dense and mixture-of-experts; tied and untied heads.
TINY_FAMILIES = {
    "qwen3": {"model_type": "qwen3", "vocab_size": 4096, "hidden_size": 192, "intermediate_size": 384,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48,
              "tie_word_embeddings": True},
    "gpt2": {"model_type": "gpt2", "vocab_size": 4096, "n_embd": 192, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "gpt_neox": {"model_type": "gpt_neox", "vocab_size": 4096, "hidden_size": 192, "intermediate_size": 512,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512},
    "phi3": {"model_type": "phi3", "vocab_size": 4096, "hidden_size": 192, "intermediate_size": 384,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
             "max_position_embeddings": 512, "pad_token_id": 0},
    "gemma2": {"model_type": "gemma2", "vocab_size": 4096, "hidden_size": 192, "intermediate_size": 384,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 48},
    "mixtral": {"model_type": "mixtral", "vocab_size": 4096, "hidden_size": 192, "intermediate_size": 256,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"model_type": "qwen3_moe", "vocab_size": 4096, "hidden_size": 192, "intermediate_size": 384,
                  "moe_intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 48, "num_experts": 8, "num_experts_per_tok": 2},
}

# The same families at a size whose engine buffers (hundreds of MiB) dwarf the estimate's calibrated
# floor for glibc's free chunks (tens of MiB): what real runs check the estimate against.
RUN_FAMILIES = {
    "qwen3": dict(TINY_FAMILIES["qwen3"], vocab_size=65536, hidden_size=384, head_dim=96, num_hidden_layers=3),
    "gpt2": dict(TINY_FAMILIES["gpt2"], vocab_size=65536, n_embd=384, n_layer=3),
    "gpt_neox": dict(TINY_FAMILIES["gpt_neox"], vocab_size=65536, hidden_size=384, num_hidden_layers=3),
    "phi3": dict(TINY_FAMILIES["phi3"], vocab_size=65536, hidden_size=384, num_hidden_layers=3),
    "mixtral": dict(TINY_FAMILIES["mixtral"], vocab_size=65536, hidden_size=384, num_hidden_layers=3),
    "qwen3_moe": dict(TINY_FAMILIES["qwen3_moe"], vocab_size=65536, hidden_size=384, head_dim=96,
                      num_hidden_layers=3),
}


# ------------------------------------------------------------------ runs side by side

def run_together(lab, jobs, at_once=2, timeout=PATIENCE):
    """Real runs of (knobs, model) pairs, `at_once` at a time (each worker's interpreter start and engine
    init are mostly one core's work: two of them share the machine's two cores); the Runs, in order.
    Each run's memory is its own worker's, so its figures do not depend on its neighbour."""
    runs = [None] * len(jobs)
    live = []
    for index, (knobs, model) in enumerate(jobs):
        if len(live) == at_once:
            done = live.pop(0)
            assert runs[done].wait(timeout) is not None, f"run {index - at_once} did not end in {timeout} s"
        runs[index] = lab.run(knobs, model=model)
        live.append(index)
    for index in live:
        assert runs[index].wait(timeout) is not None, f"run {index} did not end in {timeout} s"
    return runs

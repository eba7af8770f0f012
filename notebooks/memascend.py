# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # MemAscend's optimizations, one at a time
#
# MemAscend (a study of SSD-offloaded fine-tuning) found that much of the host
# memory DeepSpeed's ZeRO-Infinity uses is overhead, not data: fixed-size
# buffer pools sized for the largest tensor, pinned allocations rounded up,
# full-size temporaries for overflow checks. memlab implements each
# optimization as a switch under `memascend.*`: `engine="deepspeed"` sets every
# switch to DeepSpeed's behaviour, `engine="memascend"` turns them all on.
#
# This notebook runs DeepSpeed's behaviour, then each switch alone, then all
# of them, and shows what each one saves. It reads the switches this version
# of memlab has, so it grows as switches land.

# %%
import memlab
from memlab import knobs as K
from memlab.views.figures import format_bytes

lab = memlab.Lab()
STEPS = 4
docs = getattr(K, "MEMASCEND_DOCS", {})
for name, (stock, optimized) in K.MEMASCEND_SWITCHES.items():
    print(f"{name}: {stock} (DeepSpeed) -> {optimized} (MemAscend). {docs.get(name, '')}")
if not K.MEMASCEND_SWITCHES:
    print("No MemAscend switch in this version yet: only DeepSpeed's behaviour runs below.")

# %% [markdown]
# ## The runs
#
# One run at a time (each 15-30 s here). A run that fails is reported with its
# cause and the notebook goes on.

# %%
trials = {"deepspeed": ({}, "deepspeed")}
for name, (stock, optimized) in K.MEMASCEND_SWITCHES.items():
    trials[f"{name}={optimized}"] = ({name: optimized}, "deepspeed")
if K.MEMASCEND_SWITCHES:
    trials["memascend (all)"] = ({}, "memascend")

print(f"{'run':32} {'status':8} {'peak RSS':>10} {'engine':>10} {'pinned':>10} {'frag':>7} {'step':>7}")
runs = {}
for label, (knobs, engine) in trials.items():
    run = lab.run(knobs, engine=engine, steps=STEPS)
    s = run.wait()
    runs[label] = run
    step = f"{s['step_time_median_s']:.2f}s" if s["step_time_median_s"] else "–"
    print(f"{label:32} {s['status']:8} {format_bytes(s['peak_rss_bytes']):>10} "
          f"{format_bytes(s['peak_engine_host_bytes']):>10} {format_bytes(s['peak_pinned_reserved_bytes']):>10} "
          f"{s['fragmentation_at_peak']:>7.1%} {step:>7}" + (f"  ({s['error']})" if s["error"] else ""), flush=True)

# %% [markdown]
# ## What each switch saves
#
# Savings against DeepSpeed's behaviour (positive: less memory). Peak engine
# host bytes count the engine's own buffers only (not the framework, not
# activations), so they isolate what the switches change.

# %%
base = runs["deepspeed"].summary
for label, run in runs.items():
    s = run.summary
    if label == "deepspeed" or s["status"] != "ok":
        continue
    saved_engine = base["peak_engine_host_bytes"] - s["peak_engine_host_bytes"]
    saved_pinned = base["peak_pinned_reserved_bytes"] - s["peak_pinned_reserved_bytes"]
    print(f"{label:32} engine host {format_bytes(saved_engine):>10}   pinned reserved {format_bytes(saved_pinned):>10}")

# %%
lab.compare(list(runs.values()), labels=list(runs))

# %% [markdown]
# The dashboard lists these runs in its history; set the switches there one by
# one and watch the pools and the pinned chart change while a run trains.

# %%
lab.dashboard()

# %% [markdown]
# ## Try this
#
# Which switch saves the most host memory for this model, and would it still
# be the one on a 7B model, where the largest tensor is far larger than the
# typical one? (Compare `ModelSpec.resolve("qwen2.5-7b").largest_tensor` with
# its other tensors.)

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
# # What-if sizing: will it fit before you run it?
#
# Engineers size a box before they buy or book it: *will Qwen2.5-14B at 32K
# context fit in 128 GB of RAM with NVMe offload? With MemAscend's engine?
# What is the longest context that fits in 64 GB?*
#
# `memlab.estimate` answers from the model's shapes and the knobs alone, in a
# few milliseconds, with DeepSpeed 0.19.8's own sizing rules (the swap pools,
# one partition per parameter buffer, optimizer buffers sized to the largest
# sub-group, pinned-memory rounding) and terms calibrated on real runs here.
# The last section checks it against a real run made in this notebook.
# `docs/SIZING.md` gives every formula and its DeepSpeed source.

# %%
import memlab
from memlab import Knobs
from memlab.sizing import GiB, Hardware, estimate, fit
from memlab.views.figures import format_bytes

# %% [markdown]
# ## The setting
#
# A GPU node with NVMe offload, as in the MemAscend paper: bf16, one sequence
# per step, parameters and optimizer state on NVMe, gradient checkpointing
# with the checkpoints kept in host RAM (DeepSpeed's
# `activation_checkpointing.cpu_checkpointing`), `sub_group_size` 1e8. On a
# CUDA node, activations, gathered parameters and the reduce bucket are GPU
# memory; what host RAM holds is the offload engine's buffers, the gradient
# buffer and the checkpoints. `engine="deepspeed"` is DeepSpeed's behaviour,
# `engine="memascend"` every MemAscend switch on.

# %%
KNOBS = Knobs({"run.dtype": "bf16", "run.gradient_checkpointing": True, "zero_optimization.sub_group_size": 10**8},
              passthrough={"activation_checkpointing": {"cpu_checkpointing": True}})
NODE = Hardware(ram_bytes=128 * GiB, gpus=1, gpu_bytes=80 * GiB, accelerator="cuda")

question = KNOBS.set({"run.seq_len": 32768})
for engine in ("deepspeed", "memascend"):
    est = estimate("qwen2.5-14b", question, NODE, engine=engine)
    print(est.table(), "\n")

# %% [markdown]
# The stock engine's largest costs are DeepSpeed's rules, not the data: the
# gradient buffer (one bf16 element per parameter) rounded up to a power of
# two by PyTorch's pinned allocator, parameter swap buffers all sized to the
# embedding, optimizer buffers sized to the largest sub-group. MemAscend's
# exact pinning and adaptive pool take the first two back; bounded staging
# caps the optimizer buffers at 4M elements each, whatever the sub-group.

# %% [markdown]
# ## 7B to 70B, 4K to 128K context, 64 / 128 / 256 GB
#
# Peak host memory per node for each model and context, and whether it fits
# each RAM size (stock / MemAscend).

# %%
MODELS = ["qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b", "llama-3.1-70b"]
CONTEXTS = [4096, 8192, 16384, 32768, 65536, 131072]
RAMS = [64, 128, 256]


def mark(peak, ram):
    return "yes" if peak <= ram * GiB else "-"


print(f"{'model':14} {'context':>8} {'DeepSpeed':>11} {'MemAscend':>11}  " + "  ".join(f"{r:>4} GB" for r in RAMS))
grid = {}
for model in MODELS:
    for context in CONTEXTS:
        knobs = KNOBS.set({"run.seq_len": context})
        peaks = [estimate(model, knobs, NODE, engine=e).node_peak_host_bytes for e in ("deepspeed", "memascend")]
        grid[model, context] = peaks
        fits = "  ".join(f"{mark(peaks[0], r):>3}/{mark(peaks[1], r):<3}" for r in RAMS)
        print(f"{model:14} {context:>8} {format_bytes(peaks[0]):>11} {format_bytes(peaks[1]):>11}  {fits}")

# %% [markdown]
# ## The largest context that fits
#
# `memlab.fit` bisects on the estimate: the longest sequence (in steps of 1024
# tokens) whose peak host memory fits the RAM, for each engine, and the
# component that stops it. Only RAM is the budget here; the GPU column says
# what one 80 GB GPU would need at that length (without a fused-loss kernel,
# the logits alone grow by vocabulary x 4 bytes per token).

# %%
RAM_ONLY = Hardware(gpus=1, accelerator="cuda")  # no GPU budget: the question is host RAM
print(f"{'model':14} {'RAM':>6}  {'DeepSpeed':>32}  {'MemAscend':>32}")
answers = {}
for model in MODELS:
    for ram in RAMS:
        report = fit(model, KNOBS, RAM_ONLY, target="seq_len", ram_bytes=ram * GiB, multiple_of=1024,
                     maximum=1 << 20)
        answers[model, ram] = report
        cells = []
        for engine in ("deepspeed", "memascend"):
            r = report[engine]
            if r.value is None:
                cells.append(f"nothing fits ({r.binding})")
            elif r.limit == "search range":
                cells.append(f">= {r.value // 1024}K (search limit)")
            else:
                cells.append(f"{r.value // 1024}K ({r.binding})")
        print(f"{model:14} {ram:>4} GB  {cells[0]:>32}  {cells[1]:>32}")

# %%
r = answers["qwen2.5-14b", 128]["memascend"]
print(f"Qwen2.5-14B in 128 GB with MemAscend: up to {r.value:,} tokens; "
      f"GPU memory at that length: {format_bytes(r.estimate.gpu['total'])}")

# %% [markdown]
# ## Peak host memory against context
#
# Qwen2.5-14B, both engines, with the three RAM sizes as lines.

# %%
import plotly.graph_objects as go

xs = [1 << k for k in range(11, 18)]
fig = go.Figure()
for engine, colour in (("deepspeed", "#4b6584"), ("memascend", "#e67e22")):
    ys = [estimate("qwen2.5-14b", KNOBS.set({"run.seq_len": x}), NODE, engine=engine).node_peak_host_bytes / GiB
          for x in xs]
    fig.add_trace(go.Scatter(x=xs, y=ys, name=engine, mode="lines+markers", line=dict(color=colour)))
for ram in RAMS:
    fig.add_hline(y=ram, line_dash="dash", line_color="#d62728", annotation_text=f"{ram} GB")
fig.update_layout(template="plotly_white", height=420, xaxis_type="log", xaxis_title="sequence length (tokens)",
                  yaxis_title="peak host memory (GiB)", title="Qwen2.5-14B, bf16, checkpoints in host RAM")
fig

# %% [markdown]
# ## The sizing panel
#
# The same estimates, interactive: pick a preset, a `config.json` path, or
# paste a `config.json`; set the run shape, the knobs and the hardware. The
# bars are host memory per node at the peak, by component, for both engines;
# the curve redraws as the slider moves.

# %%
panel = memlab.sizing_panel(model="qwen2.5-14b", knobs=KNOBS, hardware=NODE)
panel

# %%
panel.slider.value = 32768  # the same as dragging the slider
panel.status.value

# %% [markdown]
# ## Check: the estimate against a real run
#
# A real run here (the CPU accelerator, so activations and the reduce bucket
# are host memory too), predicted first, then measured. Pools and flat
# buffers are predicted to the byte; the peaks come within a few percent
# (`tests/engine/test_sizing_accuracy.py` checks ten such runs).

# %%
lab = memlab.Lab()
check_knobs = Knobs({"run.steps": 3, "run.seq_len": 256})
predicted = estimate("tiny-llama", check_knobs)
run = lab.run(check_knobs, model="tiny-llama", wait=True)
s = run.summary
print(f"status {s['status']}")
print(f"peak RSS:          predicted {format_bytes(predicted.peak_host_bytes):>10}   "
      f"measured {format_bytes(s['peak_rss_bytes']):>10}")
print(f"peak engine host:  predicted {format_bytes(predicted.probed_peak_engine_host_bytes):>10}   "
      f"measured {format_bytes(s['peak_engine_host_bytes']):>10}")

# %%
freed = {e["id"] for e in run.events if e["kind"] == "free"}
print(f"{'buffer':24} {'predicted':>12} {'measured':>12}")
for component in ("param_pool", "param_partition_buffer", "small_partitions", "optimizer_pool", "grad_flat"):
    want = sum(b.reserved for b in predicted.buffers if b.component == component)
    got = sum(a["reserved"] for a in run.allocations if a["component"] == component and a["id"] not in freed)
    print(f"{component:24} {want:>12,} {got:>12,}  {'exact' if want == got else 'DIFFERENT'}")
steady = {k: v for k, v in run.steps[-1]["swap_by_kind"].items() if v}
print("bytes swapped per step, by kind:", "exact" if steady == predicted.swap_per_step else
      f"{steady} vs {predicted.swap_per_step}")

# %% [markdown]
# Fed the finished run, the panel adds two bars: the prediction for this run
# (attributed the way the probes can see it) and what the probes measured at
# the run's peak.

# %%
memlab.sizing_panel(run)

# %% [markdown]
# And the run as the dashboard showed it while it trained:

# %%
from memlab.views.dashboard import LiveChart

chart = LiveChart()
chart.update(run, final=True)
chart.widget

# %% [markdown]
# ## Try this
#
# Turn on one MemAscend switch alone, exact pinning:
# `estimate("llama-3.1-70b", KNOBS.set({"run.seq_len": 32768, "memascend.pinning": "exact"}), NODE)`.
# How much of MemAscend's gain on a 70B model at 32K context comes from the
# power-of-two rounding of pinned buffers alone, and which component is the
# largest left after it?

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
# # Offload knobs and their trade-offs
#
# ZeRO-3 with NVMe offload keeps parameters and optimizer state in swap files
# and pulls them into pinned host buffers when needed. The buffers are the
# host memory you pay for; their number and size are knobs. This notebook runs
# the same short fine-tuning with one knob changed at a time and puts the
# results side by side.
#
# Each run takes 15-30 s here (most of it start-up); seven runs, one after the
# other, so the notebook takes a few minutes and never holds more than one
# worker (Binder's 2 GB are enough).

# %%
import memlab
from memlab.views.figures import format_bytes

lab = memlab.Lab()
STEPS = 4
model = memlab.ModelSpec.resolve("tiny-llama")
print(model, f"largest parameter: {model.largest_tensor.name}, {model.largest_tensor.numel:,} elements")

# %% [markdown]
# memlab checks every combination before a process starts. Some values
# DeepSpeed accepts and then crashes on, minutes later: memlab refuses them
# with the knob, the value and the reason (each refusal is reproduced in plain
# DeepSpeed by the project's tests). Others DeepSpeed runs on some models and
# not on others: memlab warns about those and runs them.

# %%
for bad in ({"zero_optimization.offload_param.buffer_size": 1000},
            {"zero_optimization.offload_optimizer.buffer_count": 3},
            {"zero_optimization.stage3_max_live_parameters": 10**7}):
    try:
        knobs, spec, resolved = lab.plan(bad)
        for risk in resolved.risks:
            print("warned:", risk)
    except memlab.KnobError as exc:
        print("refused:", exc)

# %% [markdown]
# ## The trials
#
# - **buffer_count** (parameter swap buffers): more buffers, bigger
#   `param_pool`, more parameters in flight.
# - **buffer_size**: each buffer holds this many elements. memlab's `auto` is
#   the largest partition; a bigger value reserves memory no partition fills
#   (pinned fragmentation).
# - **sub_group_size**: optimizer state is swapped per sub-group; the
#   `optimizer_pool` holds buffers of the largest sub-group.
# - **pin_memory**: pinned (locked) buffers cannot be swapped out by the OS;
#   unpinned ones are ordinary pageable memory.
# - **aio.block_size**: bytes per I/O request; tensors smaller than a block
#   are not swapped and stay in host memory (`small_partitions`).

# %%
largest = model.largest_tensor.numel
trials = {
    "baseline": {},
    "param buffers 3": {"zero_optimization.offload_param.buffer_count": 3},
    "param buffers 10": {"zero_optimization.offload_param.buffer_count": 10},
    "buffer_size 4x": {"zero_optimization.offload_param.buffer_size": 4 * largest},
    "sub_group_size 2x": {"zero_optimization.sub_group_size": 2 * largest},
    "no pinning": {"zero_optimization.offload_param.pin_memory": False,
                   "zero_optimization.offload_optimizer.pin_memory": False},
    "aio block 4 MiB": {"aio.block_size": 4 << 20},
}


def row(label, s):
    step = f"{s['step_time_median_s']:.2f} s" if s["step_time_median_s"] else "–"
    return (f"{label:18} {s['status']:8} {format_bytes(s['peak_rss_bytes']):>10} "
            f"{format_bytes(s['peak_engine_host_bytes']):>10} {format_bytes(s['peak_vm_lck_bytes']):>10} "
            f"{s['fragmentation_at_peak']:>8.1%} {step:>8}")


print(f"{'trial':18} {'status':8} {'peak RSS':>10} {'engine':>10} {'locked':>10} {'frag':>8} {'step':>8}")
runs = {}
for label, knobs in trials.items():
    run = lab.run(knobs, steps=STEPS)  # one at a time: wait before the next
    summary = run.wait()
    runs[label] = run
    print(row(label, summary), flush=True)

# %% [markdown]
# Peaks side by side, and each run's RSS at its peak split into components:

# %%
lab.compare(list(runs.values()), labels=list(runs))

# %% [markdown]
# With `buffer_size 4x`, pinned bytes reserved against pinned bytes in use over
# the run: the gap between the two is the pinned fragmentation.

# %%
runs["buffer_size 4x"].plot("pinned")

# %% [markdown]
# Every run is in the store, so the dashboard's history lists them all, with
# the knobs that differ from the first run.

# %%
lab.dashboard()

# %% [markdown]
# ## Try this
#
# `buffer_size 4x` reserves four times the pinned parameter memory. Does the
# peak RSS grow by the same amount, and does the step get faster? Which of the
# seven trials would you pick on a machine with little RAM but a fast NVMe
# drive, and which knob would you turn next?

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
# # memlab quickstart: where does host memory go?
#
# memlab fine-tunes a model with the real DeepSpeed ZeRO-3 engine, parameters
# and optimizer state swapped through NVMe files (ZeRO-Infinity), and measures
# while it trains which engine component holds each byte of host RAM.
#
# Here everything runs on the CPU. The default model, `tiny-llama` (5.8M
# parameters, random weights), peaks at about 750 MiB, so this notebook fits a
# 2 GB Binder session. Runs are stored in `./memlab-runs` and survive a kernel
# restart.

# %%
import memlab
from memlab.views.report import summary_table_text

lab = memlab.Lab()
lab.store

# %% [markdown]
# ## The dashboard
#
# - **Knobs** on top, under DeepSpeed's own names (hover a name for its
#   meaning). A value DeepSpeed would refuse, or accept and then crash on, is
#   shown in red next to its knob before anything starts, and Run stays off.
# - **Run** starts a real run in a child process. The cell has already
#   returned, so the notebook stays free and **Stop** works while it trains.
# - **Live charts**, twice a second: host memory stacked by component (the
#   legend names the components), pinned buffers reserved vs used,
#   fragmentation, step time and loss, and the parameter and optimizer pool
#   buffers with how full each is.
# - **Run history** from the run store, and a comparison of the selected runs.

# %%
dash = lab.dashboard()
dash

# %% [markdown]
# The next cell presses Run from code (the same as clicking it), so that this
# notebook also runs top to bottom by itself. Scroll up: the charts fill while
# the run trains.

# %%
run = dash.start(steps=30)
run

# %% [markdown]
# ## The same run, from code
#
# `run.wait()` blocks this cell until the run ends: handy in scripts. While a
# cell blocks, the dashboard's buttons wait for it too, which is why the
# dashboard never needs `wait()`.

# %%
summary = run.wait()
print(summary_table_text(summary))

# %% [markdown]
# Each view of the dashboard is a plain plotly figure too: `run.plot()` (host
# memory by component), `run.plot("pinned")`, `"fragmentation"`, `"steps"`,
# `"pools"`. The HTML report (`run.report()`) is made of the same figures.

# %%
run.plot()

# %%
run.plot("pools")

# %% [markdown]
# ## Change a knob, run again, compare
#
# `zero_optimization.offload_param.buffer_count` is the number of parameter
# swap buffers DeepSpeed pins. More buffers means more parameters can be in
# flight at once, and a bigger `param_pool`. The run lands in the history
# table above, with the knob that differs from the first run.

# %%
more = dash.start({"zero_optimization.offload_param.buffer_count": 10}, steps=10)
more.wait()
lab.compare([run, more], labels=["5 param buffers", "10 param buffers"])

# %% [markdown]
# ## Try this
#
# In the dashboard, set `offload_param.buffer_count` to 1: what does memlab
# say, and why would DeepSpeed fail? Then set `aio.block_size` to 4194304
# (4 MiB) and run: which component grows, and why? (Hint: tensors smaller than
# one I/O block are not swapped.)

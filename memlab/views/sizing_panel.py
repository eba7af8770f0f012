"""The what-if sizing panel (`memlab.sizing_panel()`): pick a model, knobs and
hardware; see host memory by component for DeepSpeed's engine and MemAscend's
side by side, and peak host memory against sequence length (or micro batch),
redrawn as the slider moves.

Everything is computed by `memlab.sizing.estimate` (a few milliseconds each,
no process started). One FigureWidget holds both charts, and every redraw is
ONE `batch_update` (one message to the browser, not one per trace). Moving
the slider re-estimates only the two
bars and the marker; changing anything else also redraws the curve.

Fed a finished Run, the panel starts from that run's model and knobs and adds
two bars: the prediction for that run, in the probes' attribution, and the
components the run measured at its peak.
"""
import copy
import html
import json

import ipywidgets as W
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .. import components as C
from ..knobs import AUTO, DTYPES, PARAM_DEVICES, KnobError, Knobs
from ..models import ModelSpec, ModelSpecError
from ..sizing import GiB, Hardware, SizingError, estimate
from . import figures as F

ENGINES = (("deepspeed", "DeepSpeed"), ("memascend", "MemAscend"))
PREDICTED, MEASURED = "run: predicted", "run: measured"
BAR_COMPONENTS = [name for name in C.ALL if name not in C.OUTSIDE_RSS]
SEQ_VALUES = [1 << k for k in range(7, 18)]  # 128 .. 131072 tokens
BATCH_VALUES = [1, 2, 4, 8, 16, 32, 64, 128]
BUDGET = "RAM budget"
CUSTOM_PATH, CUSTOM_JSON = "(config.json path)", "(pasted config.json)"


def _nearest(values, value):
    return min(values, key=lambda v: abs(v - value))


class SizingChart:
    """The panel's one FigureWidget: host memory per node at the peak, stacked by
    component, a bar per engine (x/y), and peak host memory against sequence
    length or micro batch with the RAM budget and the current point (x2/y2).
    Each `draw` is ONE batch_update."""

    def __init__(self):
        fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58], horizontal_spacing=0.12,
                            subplot_titles=("Host memory per node at the peak", "Peak host memory per node"))
        for name in BAR_COMPONENTS:
            fig.add_trace(go.Bar(x=[], y=[], name=name, marker_color=F.component_color(name), legendgroup=name,
                                 hovertemplate=f"{name}: %{{y:.2f}}<extra>%{{x}}</extra>"), row=1, col=1)
        dash = {"deepspeed": "solid", "memascend": "solid"}
        colors = {"deepspeed": "#4b6584", "memascend": "#e67e22"}
        for engine, label in ENGINES:
            fig.add_trace(go.Scatter(x=[], y=[], name=label, mode="lines+markers",
                                     line=dict(color=colors[engine], dash=dash[engine], width=2.5),
                                     hovertemplate=f"{label}: %{{y:.2f}} at %{{x}}<extra></extra>"), row=1, col=2)
        fig.add_trace(go.Scatter(x=[], y=[], name=BUDGET, mode="lines", line=dict(color="#d62728", dash="dash"),
                                 hovertemplate="RAM budget %{y:.2f}<extra></extra>"), row=1, col=2)
        fig.add_trace(go.Scatter(x=[], y=[], name="current", mode="markers", showlegend=False,
                                 marker=dict(size=13, symbol="circle-open", color="#222", line=dict(width=2)),
                                 hovertemplate="%{y:.2f} at %{x}<extra>current</extra>"), row=1, col=2)
        fig.update_layout(template=F.TEMPLATE, barmode="stack", height=520, margin=dict(l=60, r=20, t=50, b=60),
                          legend=dict(orientation="v", x=1.02, y=1, font=dict(size=11)), hovermode="closest")
        fig.update_xaxes(type="log", title_text="sequence length (tokens)", row=1, col=2)
        self.widget = go.FigureWidget(fig)
        self.widget.add_class("memlab-sizing-figure")
        self.index = {trace.name: i for i, trace in enumerate(self.widget.data)}

    def draw(self, labels, columns, points, ram, axis, current, peaks):
        """Bars: one column of components per label. Curve (when `points` is not
        None): {"x": [...], engine: [peak bytes, ...]} over `axis`. The marker:
        each engine's peak at `current`. `ram`: the budget line (None: none)."""
        top = max(sum(v for k, v in col.items() if k in BAR_COMPONENTS) for col in columns)
        curve_top = max([ram or 0] + ([max(points["deepspeed"] + points["memascend"])] if points else [top]))
        divisor, unit = F.bytes_unit(max(top, curve_top))
        fig = self.widget
        with fig.batch_update():
            for name in BAR_COMPONENTS:
                trace = fig.data[self.index[name]]
                trace.x = labels
                trace.y = [col.get(name, 0) / divisor for col in columns]
                trace.hovertemplate = f"{name}: %{{y:.2f}} {unit}<extra>%{{x}}</extra>"
            if points is not None:
                for engine, label in ENGINES:
                    trace = fig.data[self.index[label]]
                    trace.x = points["x"]
                    trace.y = [p / divisor for p in points[engine]]
                budget = fig.data[self.index[BUDGET]]
                budget.x = [points["x"][0], points["x"][-1]] if ram else []
                budget.y = [ram / divisor] * 2 if ram else []
                fig.layout.xaxis2.title.text = "sequence length (tokens)" if axis == "seq_len" else "micro batch"
            marker = fig.data[self.index["current"]]
            marker.x = [current, current]
            marker.y = [peak / divisor for peak in peaks]
            fig.layout.yaxis.title.text = f"host memory ({unit})"
            fig.layout.yaxis2.title.text = f"peak host memory ({unit})"

    def persist(self):
        """Store the figure in the widget's synced state so a saved notebook keeps it
        (FigureWidget syncs its full state only on display; see LiveChart.persist)."""
        fig = self.widget
        fig._widget_layout = copy.deepcopy(fig._layout_obj._props)
        fig._widget_data = copy.deepcopy(fig._data)


class SizingPanel:
    """The panel's state and widgets. `widget` is what a notebook shows;
    `figure` is the FigureWidget (bars in x/y, curve in x2/y2)."""

    def __init__(self, run=None, model="qwen2.5-7b", knobs=None, hardware=None, axis="seq_len"):
        self.run = run
        self.redraws = 0
        self.curve_redraws = 0
        self.error = None
        self.estimates = {}
        if run is not None:
            model = ModelSpec.from_dict(run.model)
            knobs = Knobs.from_dict(run.knobs)
            hardware = hardware or Hardware(ram_bytes=Hardware.this_machine().ram_bytes)
        self.base_knobs = knobs if isinstance(knobs, Knobs) else Knobs(knobs or {})
        hardware = hardware or Hardware(ram_bytes=128 * GiB, gpus=1, gpu_bytes=80 * GiB, accelerator="cuda")
        self._build_controls(model, hardware, axis)
        self.chart = SizingChart()
        self.figure, self.index = self.chart.widget, self.chart.index
        self.widget = W.VBox([W.HBox([self.controls, self.figure]), self.status])
        self.widget.add_class("memlab-sizing-panel")
        self._observe()
        self.redraw(curve=True)

    # ------------------------------------------------------------------ controls
    def _build_controls(self, model, hardware, axis):
        presets = ModelSpec.presets()
        spec = model if isinstance(model, ModelSpec) else None
        self.custom_spec = None
        start = model if isinstance(model, str) and model in presets else None
        if spec is not None and spec.name in presets and spec.source == "preset":
            start = spec.name
        elif spec is not None:
            self.custom_spec = spec
        options = presets + [CUSTOM_PATH, CUSTOM_JSON] + (["(the run's model)"] if self.custom_spec else [])
        if start is None:
            start = "(the run's model)" if self.custom_spec else CUSTOM_PATH
        w = dict(style={"description_width": "120px"}, layout=W.Layout(width="300px"))
        self.model = W.Dropdown(options=options, value=start, description="model", **w)
        self.path = W.Text(value=model if isinstance(model, str) and start == CUSTOM_PATH else "",
                           description="config path", placeholder="/path/to/config.json", continuous_update=False, **w)
        self.pasted = W.Textarea(value="", description="config.json", placeholder='{"model_type": "llama", ...}',
                                 continuous_update=False, style=w["style"], layout=W.Layout(width="300px", height="80px"))
        k = self.base_knobs
        self.dtype = W.Dropdown(options=[AUTO, *DTYPES], value=k["run.dtype"], description="dtype", **w)
        self.micro_batch = W.BoundedIntText(value=k["run.micro_batch"], min=1, max=1 << 16, description="micro batch",
                                            **w)
        self.seq_len = W.BoundedIntText(value=k["run.seq_len"], min=2, max=1 << 22, description="sequence length", **w)
        self.checkpointing = W.Checkbox(value=k["run.gradient_checkpointing"], description="gradient checkpointing",
                                        indent=False)
        passthrough = getattr(k, "passthrough", {}) or {}
        self.cpu_checkpointing = W.Checkbox(
            value=bool((passthrough.get("activation_checkpointing") or {}).get("cpu_checkpointing")),
            description="checkpoints in host RAM", indent=False)
        self.param_device = W.Dropdown(options=list(PARAM_DEVICES), value=k["zero_optimization.offload_param.device"],
                                       description="params on", **w)
        self.sub_group = W.Text(value=str(k["zero_optimization.sub_group_size"]), description="sub_group_size",
                                continuous_update=False, **w)
        self.accelerator = W.ToggleButtons(options=["cpu", "cuda"], value=hardware.accelerator,
                                           description="accelerator", style={"button_width": "70px"})
        self.ram = W.BoundedFloatText(value=(hardware.ram_bytes or 0) / GiB, min=0, max=1 << 20,
                                      description="RAM GiB/node", **w)
        self.gpus = W.BoundedIntText(value=hardware.gpus, min=0, max=64, description="GPUs/node", **w)
        self.gpu_mem = W.BoundedFloatText(value=(hardware.gpu_bytes or 0) / GiB, min=0, max=4096,
                                          description="GPU GiB", **w)
        self.ranks = W.BoundedIntText(value=hardware.ranks_per_node, min=1, max=64, description="ranks/node", **w)
        self.nodes = W.BoundedIntText(value=hardware.nodes, min=1, max=4096, description="nodes", **w)
        self.axis = W.ToggleButtons(options=[("sequence length", "seq_len"), ("micro batch", "micro_batch")],
                                    value=axis, description="curve over", style={"button_width": "120px"})
        values = SEQ_VALUES if axis == "seq_len" else BATCH_VALUES
        current = k["run.seq_len"] if axis == "seq_len" else k["run.micro_batch"]
        self.slider = W.SelectionSlider(options=values, value=_nearest(values, current), description="slide",
                                        continuous_update=True, layout=W.Layout(width="300px"))
        self.status = W.HTML("")

        def section(title, *children):
            return W.VBox([W.HTML(f"<b>{html.escape(title)}</b>"), *children])

        self.controls = W.VBox([
            section("Model", self.model, self.path, self.pasted),
            section("Run shape and knobs", self.dtype, self.micro_batch, self.seq_len, self.checkpointing,
                    self.cpu_checkpointing, self.param_device, self.sub_group),
            section("Hardware", self.accelerator, self.ram, self.gpus, self.gpu_mem, self.ranks, self.nodes),
            section("Curve", self.axis, self.slider),
        ], layout=W.Layout(width="330px"))
        self._show_model_inputs()

    def _show_model_inputs(self):
        self.path.layout.display = None if self.model.value == CUSTOM_PATH else "none"
        self.pasted.layout.display = None if self.model.value == CUSTOM_JSON else "none"

    def _observe(self):
        for control in (self.model, self.path, self.pasted, self.dtype, self.micro_batch, self.checkpointing,
                        self.cpu_checkpointing, self.param_device, self.sub_group, self.accelerator, self.ram,
                        self.gpus, self.gpu_mem, self.ranks, self.nodes):
            control.observe(self._on_change, names="value")
        self.seq_len.observe(self._on_shape, names="value")
        self.micro_batch.observe(self._on_shape, names="value")
        self.axis.observe(self._on_axis, names="value")
        self.slider.observe(self._on_slide, names="value")

    def _on_change(self, change):
        if change["owner"] is self.model:
            self._show_model_inputs()
        self.redraw(curve=True)

    def _on_shape(self, change):
        # typing a value moves the slider to the nearest stop (without a second redraw)
        if getattr(self, "_quiet", False):
            return
        axis = self.axis.value
        if (axis == "seq_len" and change["owner"] is self.seq_len) or (
                axis == "micro_batch" and change["owner"] is self.micro_batch):
            self._set_slider(value=_nearest(self.slider.options, change["new"]))
        self.redraw(curve=change["owner"] is not (self.seq_len if axis == "seq_len" else self.micro_batch))

    def _on_axis(self, change):
        values = SEQ_VALUES if change["new"] == "seq_len" else BATCH_VALUES
        current = self.seq_len.value if change["new"] == "seq_len" else self.micro_batch.value
        self._set_slider(options=values, value=_nearest(values, current))
        self.redraw(curve=True)

    def _on_slide(self, change):
        if getattr(self, "_quiet", False):
            return
        target = self.seq_len if self.axis.value == "seq_len" else self.micro_batch
        self._quiet = True
        try:
            target.value = change["new"]
        finally:
            self._quiet = False
        self.redraw(curve=False)

    def _set_slider(self, options=None, value=None):
        """Move the slider without triggering a redraw of its own."""
        self._quiet = True
        try:
            if options is not None:
                self.slider.options = options
            self.slider.value = value
        finally:
            self._quiet = False

    # ------------------------------------------------------------------ inputs -> estimates
    def spec(self):
        choice = self.model.value
        if choice == CUSTOM_PATH:
            if not self.path.value.strip():
                raise ModelSpecError("model: type a config.json path or a checkpoint folder")
            return ModelSpec.resolve(self.path.value.strip())
        if choice == CUSTOM_JSON:
            text = self.pasted.value.strip()
            if not text:
                raise ModelSpecError("model: paste a config.json")
            try:
                config = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ModelSpecError(f"pasted config.json: not valid JSON ({exc.msg} at line {exc.lineno})")
            if not isinstance(config, dict):
                raise ModelSpecError("pasted config.json: expected a JSON object")
            return ModelSpec.resolve(config)
        if choice == "(the run's model)":
            return self.custom_spec
        return ModelSpec.resolve(choice)

    def knobs(self, **shape):
        values = {
            "run.dtype": self.dtype.value,
            "run.micro_batch": shape.get("micro_batch", self.micro_batch.value),
            "run.seq_len": shape.get("seq_len", self.seq_len.value),
            "run.gradient_checkpointing": self.checkpointing.value,
            "zero_optimization.offload_param.device": self.param_device.value,
            "zero_optimization.sub_group_size": self.sub_group.value.strip() or "auto",
        }
        knobs = self.base_knobs.set(values)
        passthrough = copy.deepcopy(getattr(self.base_knobs, "passthrough", {}) or {})
        section = dict(passthrough.get("activation_checkpointing") or {})
        section["cpu_checkpointing"] = bool(self.cpu_checkpointing.value)
        passthrough["activation_checkpointing"] = section
        knobs.passthrough = passthrough
        return knobs

    def hardware(self):
        cuda = self.accelerator.value == "cuda"
        gpus = self.gpus.value if cuda else 0
        ranks = self.ranks.value
        if cuda and gpus and ranks > gpus:
            ranks = gpus
        return Hardware(ram_bytes=int(self.ram.value * GiB) or None, gpus=gpus,
                        gpu_bytes=int(self.gpu_mem.value * GiB) if cuda and self.gpu_mem.value else None,
                        ranks_per_node=ranks, nodes=self.nodes.value, accelerator="cuda" if cuda else "cpu")

    def compute(self, curve=True):
        """Estimates for the bars (and the curve); raises the input's error."""
        spec, hw = self.spec(), self.hardware()
        bars = {engine: estimate(spec, self.knobs().with_engine(engine), hw) for engine, _ in ENGINES}
        points = None
        if curve:
            axis = self.axis.value
            xs = list(self.slider.options)
            points = {engine: [estimate(spec, self.knobs(**{axis: x}).with_engine(engine), hw).node_peak_host_bytes
                               for x in xs] for engine, _ in ENGINES}
            points["x"] = xs
        return spec, hw, bars, points

    def redraw(self, curve=True):
        """Recompute and redraw with ONE batch_update (the curve only when asked)."""
        try:
            spec, hw, bars, points = self.compute(curve=curve)
        except (KnobError, ModelSpecError, SizingError, ValueError, OSError) as exc:
            self.error = str(exc)
            self.status.value = f"<span style='color:#b00'>{html.escape(self.error)}</span>"
            return False
        self.error = None
        self.estimates = bars
        labels = [label for _, label in ENGINES]
        columns = [bars[engine].node_components for engine, _ in ENGINES]
        if self.run is not None:
            predicted = estimate(spec, Knobs.from_dict(self.run.knobs), Hardware())
            probed = predicted.as_probed()[predicted.peak_phase]
            measured = self.run.summary.get("components_at_peak", {}) if self.run.summary else {}
            labels += [PREDICTED, MEASURED]
            columns += [probed, measured]
        self.chart.draw(labels, columns, points, ram=hw.ram_bytes, axis=self.axis.value, current=self.slider.value,
                        peaks=[bars[engine].node_peak_host_bytes for engine, _ in ENGINES])
        if points is not None:
            self.curve_redraws += 1
        self.redraws += 1
        self.status.value = self._summary(spec, hw, bars)
        self.persist()
        return True

    def _summary(self, spec, hw, bars):
        parts = []
        for engine, label in ENGINES:
            est = bars[engine]
            fits = "" if not hw.ram_bytes else (" fits" if est.fits() else " <b>does not fit</b>")
            gpu = f", GPU {F.format_bytes(est.gpu_peak_bytes)}/device" if est.gpu is not None else ""
            parts.append(f"{label}: {F.format_bytes(est.node_peak_host_bytes)} per node "
                         f"(peak in {est.peak_phase.replace('_', ' ')}){gpu}{fits}")
        shape = f"{self.micro_batch.value} x {self.seq_len.value} tokens"
        return (f"<div class='memlab-sizing-status'>{html.escape(spec.name)}, {shape}: "
                + "; ".join(parts) + "</div>")

    def persist(self):
        """Store the figure in the widget's synced state so a saved notebook keeps it."""
        self.chart.persist()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)


def sizing_panel(run=None, model="qwen2.5-7b", knobs=None, hardware=None, axis="seq_len"):
    """The what-if sizing panel: a SizingPanel (display it, or its `.widget`)."""
    return SizingPanel(run=run, model=model, knobs=knobs, hardware=hardware, axis=axis)

"""The dashboard's knob panel: the model, the engine, every MemAscend switch
and the DeepSpeed knobs that matter for host memory, each with its message
line. `check` puts each problem next to its knob before anything starts."""
import html

import ipywidgets as W

from .. import knobs as K
from ..models import ModelSpec, ModelSpecError

# The DeepSpeed knobs that matter for host memory, and the run shape, by section.
SECTIONS = (
    ("Parameter offload", (
        "zero_optimization.offload_param.device",
        "zero_optimization.offload_param.buffer_count",
        "zero_optimization.offload_param.buffer_size",
        "zero_optimization.offload_param.max_in_cpu",
        "zero_optimization.offload_param.pin_memory",
    )),
    ("Optimizer offload", (
        "zero_optimization.offload_optimizer.device",
        "zero_optimization.offload_optimizer.buffer_count",
        "zero_optimization.offload_optimizer.pin_memory",
        "zero_optimization.offload_optimizer.pipeline_read",
        "zero_optimization.offload_optimizer.pipeline_write",
    )),
    ("ZeRO-3", (
        "zero_optimization.sub_group_size",
        "zero_optimization.stage3_max_reuse_distance",
        "zero_optimization.stage3_max_live_parameters",
        "zero_optimization.stage3_prefetch_bucket_size",
        "zero_optimization.reduce_bucket_size",
    )),
    ("Async I/O (aio)", (
        "aio.block_size",
        "aio.queue_depth",
        "aio.intra_op_parallelism",
    )),
    ("Allocator", (
        "allocator.DS_PIN_MEMORY_BACKEND",
        "allocator.MALLOC_ARENA_MAX",
        "allocator.MALLOC_MMAP_THRESHOLD_",
        "allocator.malloc_trim",
    )),
    ("Run shape", (
        "run.steps",
        "run.micro_batch",
        "run.grad_accum",
        "run.seq_len",
        "run.dtype",
        "run.gradient_checkpointing",
    )),
)
PANEL_KNOBS = tuple(name for _, names in SECTIONS for name in names)


def preset_choices():
    """(label, name) of every preset, smallest first, labelled with its size so
    nobody starts a 70B run by accident."""
    out = []
    for name in ModelSpec.presets():
        try:
            n = ModelSpec.resolve(name).num_params
        except (ModelSpecError, OSError, ValueError):
            continue
        size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        out.append((n, f"{name} ({size} params)", name))
    out.sort()
    return [(label, name) for _, label, name in out]


class KnobField:
    """A knob's control, and the message line right under it."""

    def __init__(self, name, spec=None, choices=None, description=None, value=None):
        self.name = name
        self.spec = spec
        doc = description or (spec.doc if spec else "")
        # The section says where a knob lives; the label is its last name part, the tooltip its full name.
        label = W.HTML(f"<span title='{html.escape(name)}: {html.escape(doc)}'>{html.escape(name.split('.')[-1])}"
                       "</span>", layout=W.Layout(width="190px"))
        if choices is not None:
            wide = max(len(str(label)) for label, *_ in choices) > 16 if isinstance(choices[0], tuple) else False
            self.control = W.Dropdown(options=choices, value=value,
                                      layout=W.Layout(width="135px" if not wide else "170px"))
        elif spec.kind == "bool":
            self.control = W.Checkbox(value=bool(value), indent=False, layout=W.Layout(width="135px"))
        elif spec.kind == "choice":
            options = list(spec.choices) if not spec.optional else [("(default)", None)] + list(spec.choices)
            if spec.auto:
                options = [K.AUTO] + options
            self.control = W.Dropdown(options=options, value=value, layout=W.Layout(width="135px"))
        else:
            self.control = W.Text(value="" if value is None else str(value), layout=W.Layout(width="135px"),
                                  continuous_update=False, placeholder="auto" if spec.auto else "")
        self.control.add_class("memlab-knob")
        self.control.add_class("memlab-knob-" + name.replace(".", "-").replace("_", "-"))
        self.message = W.HTML("", layout=W.Layout(margin="0 0 0 4px"))
        self.box = W.VBox([W.HBox([label, self.control]), self.message])

    @property
    def value(self):
        value = self.control.value
        if isinstance(self.control, W.Text):
            value = value.strip()
            if value == "":
                return None
        return value

    @value.setter
    def value(self, value):
        if isinstance(self.control, W.Text):
            self.control.value = "" if value is None else str(value)
        else:
            self.control.value = value

    def show(self, text, kind="msg"):
        new = f"<div class='memlab-{kind}'>{html.escape(text)}</div>" if text else ""
        if self.message.value != new:
            self.message.value = new


def _section(title, fields):
    return W.VBox([W.HTML(f"<div class='memlab-section-title'>{html.escape(title)}</div>")]
                  + [f.box for f in fields], layout=W.Layout(width="auto")).add_class("memlab-section")


class KnobPanel:
    """The knobs of the next run. `widget` is the grid of sections; `fields`
    maps each knob name to its KnobField (`model`, `config_path` and `engine`
    are fields of their own). `on_change()` is called after every change a user
    makes, and once after `set`."""

    def __init__(self, steps, model=None, on_change=lambda: None):
        self.on_change = on_change
        self._syncing = False
        self.switches = dict(K.MEMASCEND_SWITCHES)  # read now: switches register at import of memascend
        presets = preset_choices()
        names = [value for _, value in presets]
        self.model = KnobField("model", choices=presets, value=model if model in names else names[0],
                               description="model preset (an architecture config with random weights)")
        self.config_path = KnobField("config path", K.Knob("config path", None, "path", "", optional=True),
                                     description="a config.json or a checkpoint folder; overrides the preset")
        self.config_path.control.placeholder = "config.json or folder"
        engines = ["deepspeed", "memascend"] + (["custom"] if self.switches else [])
        self.engine = KnobField("engine", choices=engines, value="deepspeed",
                                description="deepspeed: stock behaviour; memascend: every optimization on")
        self.fields = {}
        for name, (stock, optimized) in self.switches.items():
            spec = K.SPEC_BY_NAME.get(name)
            doc = getattr(K, "MEMASCEND_DOCS", {}).get(name) or (spec.doc if spec else "")
            doc = f"{doc} ({stock}: DeepSpeed's behaviour; {optimized}: MemAscend's)".strip()
            self.fields[name] = KnobField(name, spec, choices=[(f"{stock} (DeepSpeed)", stock),
                                                               (f"{optimized} (MemAscend)", optimized)],
                                          value=stock, description=doc)
        defaults = {s.name: s.default for s in K.SPECS}
        defaults["run.steps"] = steps
        for name in PANEL_KNOBS:
            spec = K.SPEC_BY_NAME.get(name)
            if spec is None:
                continue  # a knob this version does not have
            self.fields[name] = KnobField(name, spec, value=defaults[name])
        switch_fields = [self.fields[n] for n in self.switches]
        memascend_note = [] if self.switches else [W.HTML(
            "<div class='memlab-hint'>No MemAscend switch in this version yet: "
            "engine=memascend is refused until one lands.</div>")]
        model_section = W.VBox([W.HTML("<div class='memlab-section-title'>Model and engine</div>"),
                                self.model.box, self.config_path.box, self.engine.box,
                                W.HTML("<div class='memlab-section-title'>MemAscend switches</div>")]
                               + [f.box for f in switch_fields] + memascend_note).add_class("memlab-section")
        sections = [model_section] + [
            _section(title, [self.fields[n] for n in names if n in self.fields]) for title, names in SECTIONS]
        self.widget = W.GridBox(sections, layout=W.Layout(
            grid_template_columns="repeat(auto-fill, minmax(360px, 1fr))", grid_gap="6px 8px", width="100%"))
        self.widget.add_class("memlab-knob-panel")
        for field in self.all_fields():
            field.control.observe(self._on_knob_change, names="value")

    def all_fields(self):
        return [self.model, self.config_path, self.engine] + list(self.fields.values())

    def _switch_all(self, engine):
        """engine=deepspeed or memascend sets every MemAscend switch to match."""
        if self.switches and engine in ("deepspeed", "memascend"):
            for name, (stock, optimized) in self.switches.items():
                self.fields[name].value = optimized if engine == "memascend" else stock

    def _on_knob_change(self, change):
        if self._syncing:
            return
        self._syncing = True
        try:
            owner = change["owner"]
            if owner is self.engine.control:
                self._switch_all(change["new"])
            elif self.switches and any(owner is self.fields[n].control for n in self.switches):
                on = [self.fields[n].value == opt for n, (_, opt) in self.switches.items()]
                self.engine.value = "memascend" if all(on) else "deepspeed" if not any(on) else "custom"
        finally:
            self._syncing = False
        self.on_change()

    def set(self, values=None, **short):
        """Set knobs as a user would: dotted names, `model=`, `engine=`,
        `config_path=`, or run-shape keywords (`steps=40`)."""
        values = dict(values or {})
        for key in ("model", "engine", "config_path"):
            if key in short:
                values[key] = short.pop(key)
        values.update({f"run.{k}": v for k, v in short.items()})
        self._syncing = True
        try:
            for name, value in values.items():
                field = {"model": self.model, "engine": self.engine, "config_path": self.config_path}.get(name) \
                    or self.fields.get(name)
                if field is None:
                    raise K.KnobError(name, value, "not in the dashboard's knob panel")
                if name == "engine":
                    self._switch_all(value)
                field.value = value
        finally:
            self._syncing = False
        self.on_change()

    def request(self):
        """(knob values, model, engine) as the panel says, for `Lab.plan`/`Lab.run`."""
        values = {}
        for name, field in self.fields.items():
            value = field.value
            if value is None and not (field.spec and field.spec.optional):
                value = K.AUTO if field.spec and field.spec.auto else value
            values[name] = value
        model = self.config_path.value or self.model.value
        engine = self.engine.value if self.engine.value != "custom" else None
        return values, model, engine

    def check(self, lab):
        """Check the panel as it is with `lab.plan`; put each problem next to its
        knob. Returns (plan or None, the first problem in a line or "")."""
        values, model, engine = self.request()
        problems = {}
        for name, value in values.items():  # each field on its own: every bad field at once
            try:
                K.Knobs._check(name, value)
            except K.KnobError as exc:
                problems[name] = exc.reason
        plan = None
        general = ""
        if not problems:
            try:
                plan = lab.plan(values, model=model, engine=engine)
            except K.KnobError as exc:
                if exc.knob in self.fields or exc.knob == "engine":
                    problems[exc.knob] = f"{exc.reason}" if exc.knob != "engine" else exc.reason
                else:
                    general = str(exc)
            except ModelSpecError as exc:
                problems["config path" if self.config_path.value else "model"] = str(exc)
        for field in self.all_fields():
            if field.name in problems:
                field.show(problems[field.name])
            elif plan is not None and field.spec is not None and field.spec.auto and field.value in (None, K.AUTO):
                resolved = plan[2][field.name]
                field.show(f"auto = {resolved:,} elements" if isinstance(resolved, int) else f"auto = {resolved}",
                           kind="hint")
            else:
                field.show("")
        if not (problems or general):
            return plan, ""
        first = general or next(f"{n}: {m}" for n, m in problems.items())
        return plan, first + (f" (and {len(problems) - 1} more, marked above)" if len(problems) > 1 else "")

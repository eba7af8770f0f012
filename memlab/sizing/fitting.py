"""fit: the largest sequence length, micro batch or model whose estimate fits a
budget (RAM per node, memory per GPU), for each engine, by bisection on the
estimator."""
from dataclasses import dataclass, field
from typing import Optional

from .estimator import estimate
from .hardware import Hardware, SizingError
from .result import Estimate, _fmt

TARGETS = ("seq_len", "micro_batch", "model")
SEARCH_LIMITS = {"seq_len": 1 << 22, "micro_batch": 1 << 16}


@dataclass
class FitResult:
    """The answer for one engine. `value` is the largest seq_len / micro_batch /
    model that fits (None: not even the smallest); `estimate` is at that value;
    `binding` names the component that stops it (the one that grows most from
    the last fitting to the first failing value, or the largest where nothing
    fits), prefixed "gpu:" when the GPU budget binds; `limit` says what ended
    the search: "ram", "gpu", or "search range"."""

    engine: str
    target: str
    value: object
    estimate: Optional[Estimate]
    binding: Optional[str]
    limit: str
    failing: Optional[Estimate] = None
    failing_value: object = None
    evaluated: int = 0
    errors: dict = field(default_factory=dict)  # model -> KnobError text (target="model")

    def to_dict(self):
        return {"engine": self.engine, "target": self.target, "value": self.value, "binding": self.binding,
                "limit": self.limit, "failing_value": self.failing_value, "evaluated": self.evaluated,
                "peak_host_bytes": None if self.estimate is None else self.estimate.peak_host_bytes,
                "node_peak_host_bytes": None if self.estimate is None else self.estimate.node_peak_host_bytes,
                "gpu_peak_bytes": None if self.estimate is None else self.estimate.gpu_peak_bytes,
                "errors": dict(self.errors)}


@dataclass
class FitReport:
    target: str
    ram_bytes: Optional[int]
    gpu_bytes: Optional[int]
    results: dict  # engine -> FitResult

    def __getitem__(self, engine):
        return self.results[engine]

    def to_dict(self):
        return {"target": self.target, "ram_bytes": self.ram_bytes, "gpu_bytes": self.gpu_bytes,
                "results": {k: r.to_dict() for k, r in self.results.items()}}

    def table(self):
        budget = []
        if self.ram_bytes:
            budget.append(f"RAM {_fmt(self.ram_bytes)} per node")
        if self.gpu_bytes:
            budget.append(f"GPU {_fmt(self.gpu_bytes)} per device")
        lines = [f"largest {self.target} that fits {' and '.join(budget) or '(no budget)'}:"]
        for engine, r in self.results.items():
            if r.value is None:
                what = "nothing fits" + _why_nothing_fits(r, self.ram_bytes, self.gpu_bytes)
            else:
                what = f"{r.value}" + (f" (peak {_fmt(r.estimate.node_peak_host_bytes)})" if r.estimate else "")
            binding = f"; binding: {r.binding}" if r.binding else ""
            lines.append(f"  {engine:10s} {what}{binding}  [{r.limit}]")
            lines += [f"  {'':10s} skipped {name}: {why}" for name, why in r.errors.items()]
        return "\n".join(lines)


def _why_nothing_fits(result, ram, gpu):
    """': at seq_len 2 the node peaks at 180 GiB, over RAM 1 GiB' (or why there was nothing to try)."""
    failing = result.failing
    if failing is None:
        return ": no candidate could be estimated" if result.errors else ""
    at = f"at {result.target} {result.failing_value}" if result.target != "model" else f"the smallest, {result.failing_value},"
    over = []
    if ram is not None and failing.node_peak_host_bytes > ram:
        over.append(f"the node peaks at {_fmt(failing.node_peak_host_bytes)}, over RAM {_fmt(ram)}")
    if gpu is not None and failing.gpu is not None and failing.gpu["total"] > gpu:
        over.append(f"a GPU needs {_fmt(failing.gpu['total'])}, over {_fmt(gpu)}")
    return f": {at} " + " and ".join(over) if over else ""


def _binding(fitting, failing, ram, gpu):
    """The component that stops growth: compare the failing estimate with the fitting one."""
    over_gpu = gpu is not None and failing.gpu is not None and failing.gpu["total"] > gpu
    over_ram = ram is not None and failing.node_peak_host_bytes > ram
    if over_gpu and not over_ram:
        parts = {k: failing.gpu[k] for k in ("persistent_params", "param_partitions", "params_gathered", "activations", "reduce_bucket",
                                             "boundary_gradients")}
        base = {k: (fitting.gpu[k] if fitting is not None else 0) for k in parts}
        growth = {k: parts[k] - base[k] for k in parts}
        key = max(growth, key=growth.get) if fitting is not None and max(growth.values()) > 0 else max(parts, key=parts.get)
        return "gpu:" + key, "gpu"
    parts = failing.components
    if fitting is None:
        return failing.largest_component(), "ram"
    before = fitting.components
    growth = {k: parts.get(k, 0) - before.get(k, 0) for k in parts}
    key = max(growth, key=growth.get)
    if growth[key] <= 0:
        key = failing.largest_component()
    return key, "ram"


def fit(model=None, knobs=None, hardware=None, target="seq_len", models=None, ram_bytes=None, gpu_bytes=None,
        engines=("deepspeed", "memascend"), minimum=None, maximum=None, multiple_of=1):
    """The largest `target` (seq_len, micro_batch, or the largest of `models`)
    whose estimate fits `ram_bytes` per node (and `gpu_bytes` per GPU), for each
    engine. Budgets default to the hardware's. Bisection on the estimator:
    peak memory grows monotonically with sequence length and micro batch."""
    from ..knobs import Knobs

    if target not in TARGETS:
        raise SizingError(f"target={target!r}: must be one of {', '.join(TARGETS)}")
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise SizingError(f"multiple_of={multiple_of!r}: must be a whole number >= 1")
    for name, bound in (("minimum", minimum), ("maximum", maximum)):
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
            raise SizingError(f"{name}={bound!r}: must be a whole number >= 1")
    if minimum is not None and maximum is not None and minimum > maximum:
        raise SizingError(f"minimum={minimum} is above maximum={maximum}: nothing to search")
    hw = hardware if hardware is not None else Hardware()
    ram = ram_bytes if ram_bytes is not None else hw.ram_bytes
    gpu = gpu_bytes if gpu_bytes is not None else hw.gpu_bytes
    if ram is None and gpu is None:
        raise SizingError("fit needs a budget: ram_bytes (per node) or gpu_bytes (per GPU), or hardware with one")
    if isinstance(knobs, dict) or knobs is None:
        base = Knobs(knobs or {})
    else:
        base = knobs
    results = {}
    for engine in engines:
        engine_knobs = base.with_engine(engine)
        if target == "model":
            if not models:
                raise SizingError("target='model' needs models=[...] (preset names, config paths or dicts)")
            results[engine] = _fit_models(models, engine_knobs, hw, ram, gpu, engine)
            continue
        if model is None:
            raise SizingError(f"target={target!r} needs a model")
        low = max(minimum or (2 if target == "seq_len" else 1), multiple_of)
        low = -(-low // multiple_of) * multiple_of
        high = maximum or SEARCH_LIMITS[target]
        results[engine] = _fit_value(model, engine_knobs, hw, ram, gpu, engine, target, low, high, multiple_of)
    return FitReport(target, ram, gpu, results)


def _fit_value(model, knobs, hw, ram, gpu, engine, target, low, high, multiple_of):
    """The largest run.<target> from `low` to `high` (a multiple of `multiple_of`) that fits: double from
    `low` until an estimate does not fit, then bisect between the last that fits and the first that does not."""
    name = f"run.{target}"
    count = 0

    def at(value):
        nonlocal count
        count += 1
        return estimate(model, knobs.set({name: value}), hw)

    first = at(low)
    if not first.fits(ram, gpu):
        binding, limit = _binding(None, first, ram, gpu)
        return FitResult(engine, target, None, None, binding, limit, first, low, count)
    good, good_est, bad, bad_est = low, first, None, None

    def step(value):
        """Estimate at `value` and narrow the bracket; whether it fits."""
        nonlocal good, good_est, bad, bad_est
        est = at(value)
        if est.fits(ram, gpu):
            good, good_est = value, est
            return True
        bad, bad_est = value, est
        return False

    value = low
    while bad is None:
        value = min(value * 2, high)
        value -= value % multiple_of
        if value <= good or (step(value) and value >= high):
            break
    if bad is None:
        return FitResult(engine, target, good, good_est, None, "search range", None, None, count)
    while bad - good > multiple_of:
        mid = (good + bad) // 2
        mid -= mid % multiple_of
        if mid <= good:
            break
        step(mid)
    binding, limit = _binding(good_est, bad_est, ram, gpu)
    return FitResult(engine, target, good, good_est, binding, limit, bad_est, bad, count)


def _fit_models(models, knobs, hw, ram, gpu, engine):
    from ..knobs import KnobError
    from ..models import ModelSpec, ModelSpecError

    errors = {}  # a candidate memlab cannot use is reported with why, not fatal to the others
    specs = []
    for m in models:
        try:
            specs.append(ModelSpec.resolve(m))
        except ModelSpecError as exc:
            errors[m if isinstance(m, str) else repr(m)] = str(exc)
    specs.sort(key=lambda s: s.num_params)
    best = best_est = failing = failing_value = None
    count = 0
    for spec in specs:
        try:
            est = estimate(spec, knobs, hw)
        except KnobError as exc:
            errors[spec.name] = str(exc)
            continue
        count += 1
        if est.fits(ram, gpu):
            best, best_est = spec.name, est
        elif failing is None:
            failing, failing_value = est, spec.name
    binding = limit = None
    if failing is not None:
        binding, limit = _binding(best_est, failing, ram, gpu)
    return FitResult(engine, "model", best, best_est, binding, limit or "search range", failing, failing_value, count,
                     errors)

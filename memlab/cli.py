"""memlab's command line: run | estimate | fit | demo | report.

Exit status: 0 for a run that finished, 1 for a run that failed or was
stopped, 2 for bad input (a one-line cause on stderr, nothing started).
"""
import argparse
import contextlib
import json
import os
import signal
import sys

from .errors import InputError
from .knobs import DS_TOP_LEVEL_KEYS, KnobError, Knobs, read_json_object
from .oplocks import StaleOpLock
from .units import GiB, format_in, parse_bytes


def _value(text):
    """--set values: JSON where it parses (numbers, true, null), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_knobs_file(path, engine):
    """A memlab knobs file (has "engine") or a DeepSpeed ds_config.json."""
    data = read_json_object(path, "--knobs")
    if "engine" in data:
        knobs = Knobs.from_dict(data)
        return knobs if engine is None else knobs.with_engine(engine)
    return Knobs.from_ds_config(data, engine=engine or "deepspeed")


def knobs_from_args(args):
    engine = getattr(args, "engine", None)
    knobs = load_knobs_file(args.knobs, engine) if args.knobs else Knobs(engine=engine or "deepspeed")
    changes, ds_changes = {}, {}
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise KnobError("--set", item, "expected KEY=VALUE, e.g. aio.block_size=2097152")
        key = key.strip()
        (ds_changes if key in DS_TOP_LEVEL_KEYS else changes)[key] = _value(text.strip())
    if ds_changes:
        knobs = knobs.set_ds(ds_changes)
    if args.steps is not None:
        changes["run.steps"] = args.steps
    if getattr(args, "budget", None) is not None:
        changes["run.budget"] = args.budget
    return knobs.set(changes) if changes else knobs


def _add_run_arguments(parser):
    parser.add_argument("--model", default="tiny-llama", help="preset name, config.json path or checkpoint folder")
    parser.add_argument("--engine", choices=("deepspeed", "memascend"), default=None)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="change one knob (repeatable)")
    parser.add_argument("--knobs", metavar="FILE.json", help="a memlab knobs file or a DeepSpeed ds_config.json")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--budget", default=None, metavar="SIZE",
                        help="host memory the worker may use, e.g. 6GiB; over it the run ends over_budget")
    parser.add_argument("--out", metavar="DIR", default=None, help="run store (default ./memlab-runs)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _progress(run, new_events):
    for event in new_events:
        if event["kind"] == "step":
            print(f"memlab: step {event['index']}  loss {event['loss']:.4f}  {event['seconds']:.2f} s  "
                  f"swap in {format_in(event['swap_in_bytes'])}  out {format_in(event['swap_out_bytes'])}",
                  file=sys.stderr, flush=True)
        elif event["kind"] == "phase" and event["name"] in ("import", "model_init", "engine_init"):
            print(f"memlab: {event['name'].replace('_', ' ')} ...", file=sys.stderr, flush=True)


def execute(args, report=False):
    """One run from the arguments; returns the exit status."""
    summary = run_and_print(args, report)
    if summary["status"] != "ok":
        print(f"memlab: run {summary['status']}: {summary['error']}", file=sys.stderr)
        return 1
    return 0


def interrupt_on_stop_signals():
    """Ctrl-C and SIGTERM stop the run cleanly, whatever dispositions this
    process inherited (a shell's background job starts with SIGINT ignored)."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def run_and_print(args, report=False):
    """Start a run, follow it with a progress line per step, print its summary."""
    from .lab import Lab
    from .views.report import summary_table_text

    knobs = knobs_from_args(args)
    with users_paths():  # the run store (--out) and the swap folder are the user's
        lab = Lab(args.out)
        interrupt_on_stop_signals()
        run = lab.run(knobs, model=args.model)  # validates before starting anything
    print(f"memlab: run {run.run_id} in {run.path}", file=sys.stderr, flush=True)
    run.add_listener(_progress)
    try:
        summary = run.wait()
    except KeyboardInterrupt:
        print("memlab: stopping ...", file=sys.stderr, flush=True)
        summary = run.stop()
    if report:
        path = run.report()
        print(f"memlab: report written to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(summary_table_text(summary))
    return summary


DEMO_FIELDS = ("peak_rss_bytes", "peak_engine_host_bytes", "peak_pinned_reserved_bytes", "peak_pinned_used_bytes",
               "fragmentation_at_peak", "step_time_median_s")


def demo(args):
    """The default preset twice: DeepSpeed's behaviour, then every MemAscend
    optimization on; each run's summary and report, then the two side by side."""
    from .knobs import MEMASCEND_DOCS
    from .views.report import format_value

    if args.engine is not None:
        return execute(args, report=True)  # one engine asked for: one run
    summaries = {}
    for engine in ("deepspeed", "memascend"):
        args.engine = engine
        print(f"memlab: demo run with engine={engine}", file=sys.stderr, flush=True)
        summaries[engine] = run_and_print(args, report=True)
        if summaries[engine]["status"] != "ok":
            print(f"memlab: run failed: {summaries[engine]['error']}", file=sys.stderr)
            return 1
    stock, optimized = summaries["deepspeed"], summaries["memascend"]
    print("\nMemAscend vs DeepSpeed on this run:")
    print(f"  {'':28s} {'deepspeed':>12s} {'memascend':>12s}  ratio")
    for field in DEMO_FIELDS:
        a, b = stock[field], optimized[field]
        ratio = f"{b / a:.2f}" if a else "–"
        print(f"  {field:28s} {format_value(field, a):>12s} {format_value(field, b):>12s}  {ratio}")
    same = "identical" if stock["losses"] == optimized["losses"] else "DIFFERENT"
    print(f"  losses: {same}")
    print("  (the default preset is Binder-sized, so the engine's buffers are small; README.md has the\n"
          "   same comparison on an embedding-heavy model: benchmarks/ablation.py)")
    print("\nThe optimizations (memascend.* knobs, each on or off on its own):")
    for name, text in MEMASCEND_DOCS.items():
        print(f"  {name:30s} {text}")
    return 0


def _gib(text):
    """--ram 128 / --ram 128GiB / --ram 64G / --ram 1.5T: a size in GiB unless a
    unit says otherwise (memlab.units: G is GiB, as for --budget)."""
    try:
        return parse_bytes(text, unit=GiB)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}")


def _whole(text):
    """A whole number >= 1 (--multiple-of, --nodes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a whole number >= 1")
    return value


def _add_hardware_arguments(parser):
    parser.add_argument("--ram", type=_gib, default=None, metavar="GIB", help="host RAM per node (budget)")
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per node (CUDA); 0 = DeepSpeed's CPU accelerator")
    parser.add_argument("--gpu-mem", type=_gib, default=None, metavar="GIB", help="memory per GPU (budget)")
    parser.add_argument("--ranks-per-node", type=int, default=None, help="ranks per node (default: GPUs, or 1)")
    parser.add_argument("--nodes", type=int, default=1)


def hardware_from_args(args, knobs):
    """The machine of --ram/--gpus/--gpu-mem/--ranks-per-node/--nodes; a knob
    run.ranks counts as the ranks per node (they must agree if both are given)."""
    from .sizing import Hardware

    ranks = args.ranks_per_node if args.ranks_per_node is not None else max(1, args.gpus)
    if knobs["run.ranks"] != 1:  # its default: one rank
        if args.ranks_per_node is not None and args.ranks_per_node != knobs["run.ranks"]:
            raise InputError(f"run.ranks={knobs['run.ranks']} and --ranks-per-node {args.ranks_per_node} disagree: "
                             f"give one of them")
        ranks = knobs["run.ranks"]
    return Hardware(ram_bytes=args.ram, gpus=args.gpus, gpu_bytes=args.gpu_mem, ranks_per_node=ranks,
                    nodes=args.nodes, accelerator="cuda" if args.gpus else "cpu")


def cmd_estimate(args):
    from .sizing import estimate

    knobs = knobs_from_args(args)
    result = estimate(args.model, knobs, hardware_from_args(args, knobs))
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.table())
    return 0


def cmd_fit(args):
    from .sizing import fit

    engines = (args.engine,) if args.engine else ("deepspeed", "memascend")
    knobs = knobs_from_args(args)
    report = fit(args.model, knobs, hardware_from_args(args, knobs), target=args.target,
                 models=args.models, engines=engines, multiple_of=args.multiple_of)
    print(json.dumps(report.to_dict(), indent=1) if args.json else report.table())
    return 0


def cmd_report(args):
    from .runs import load_run

    with users_paths():  # the run folder and the report path named on the command line
        run = load_run(args.run)
        path = run.report(args.output)
    print(path)
    return 0


@contextlib.contextmanager
def users_paths():
    """An OSError inside is about a file or folder the user named: bad input
    (exit 2, one line), not a bug. Elsewhere an OSError prints its traceback."""
    try:
        yield
    except OSError as exc:
        raise InputError(str(exc)) from exc


class OneLineParser(argparse.ArgumentParser):
    """Argument errors as one line (memlab: error: ...), exit status 2."""

    def error(self, message):
        self.exit(2, f"memlab: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = OneLineParser(prog="memlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    run = sub.add_parser("run", help="one real offloaded fine-tuning run; prints its summary")
    _add_run_arguments(run)
    demo = sub.add_parser("demo", help="the default preset with DeepSpeed's engine and with MemAscend's, "
                                       "their HTML reports and a comparison")
    _add_run_arguments(demo)
    est = sub.add_parser("estimate", help="predict host memory (and GPU, NVMe, I/O) of a configuration; runs nothing")
    _add_run_arguments(est)
    _add_hardware_arguments(est)
    fitp = sub.add_parser("fit", help="the largest sequence length, micro batch or model that fits a RAM (and GPU) "
                                      "budget, for DeepSpeed's engine and MemAscend's")
    _add_run_arguments(fitp)
    _add_hardware_arguments(fitp)
    fitp.add_argument("--target", choices=("seq_len", "micro_batch", "model"), default="seq_len")
    fitp.add_argument("--models", nargs="+", metavar="MODEL", help="candidates for --target model")
    fitp.add_argument("--multiple-of", type=_whole, default=1, help="answer in multiples of this (e.g. 1024 tokens)")
    report = sub.add_parser("report", help="write the HTML report of a stored run")
    report.add_argument("run", help="run folder")
    report.add_argument("-o", "--output", default=None, help="HTML path (default RUN/report.html)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return execute(args)
        if args.command == "demo":
            return demo(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "estimate":
            return cmd_estimate(args)
        if args.command == "fit":
            return cmd_fit(args)
    # Refused before anything started: bad input, or a stale op build lock (named with the command
    # that clears it). Anything else is a bug and prints its traceback.
    except (InputError, StaleOpLock) as exc:
        print(f"memlab: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader went away (`memlab estimate --json | head`): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())

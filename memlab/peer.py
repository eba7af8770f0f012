"""DeepSpeed's own tests, stock and with memlab's engine switches.

As a pytest plugin, `-p memlab.peer --memlab-switches=SPEC` ("all", or switch
names separated by commas) installs the switches in the test process and,
through the environment every rank and pool the tests spawn inherits, in
each of those (memlab.engine.attached). Without the option it does nothing.

As a command, it runs a DeepSpeed checkout's tests (DeepSpeed's ZeRO-3
offload tests by default) once stock and once per switch set, and prints the
difference: every test that passes stock and does not pass with the switches.

    python -m memlab.peer DEEPSPEED_CHECKOUT [--switches all,memascend.pool] [--out DIR] [TEST ...]

TEST paths are relative to the checkout; the installed deepspeed is the one
tested (the checkout gives the tests only; nothing is fetched). Exit status 1
when any test regressed.
"""
import argparse
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from . import oplocks

# DeepSpeed's tests that build ZeRO-3 engines with parameters or optimizer offloaded (tests/unit of
# DeepSpeed 0.19); `sequential` ones included (the NVMe checkpoint tests are marked so)
DEFAULT_TESTS = (
    "tests/unit/runtime/zero/test_nvme_checkpointing.py",
    "tests/unit/runtime/zero/test_zero_tensor_fragment.py",
    "tests/unit/v1/zero/test_offload_states.py",
    "tests/unit/checkpoint/test_zero_optimizer.py",
)
DEFAULT_KEYWORDS = "(nvme and 3) or zero3 or nvme_checkpointing"  # ZeRO-3 with NVMe offload, offload_states
LOCAL_SIZE = 2  # devices the CPU accelerator reports, unless LOCAL_SIZE is set
MARKERS = "sequential or not sequential"  # DeepSpeed's pytest.ini deselects sequential tests


def pytest_addoption(parser):
    parser.addoption("--memlab-switches", default=None,
                     help="install memlab's engine switches in every test process: 'all' or names, comma-separated")


def pytest_configure(config):
    spec = config.getoption("--memlab-switches")
    if spec:
        from .engine import attached

        os.environ.update(attached.environment(spec))  # for every process the tests start
        attached.install_from_environment()  # and this one


def outcomes(junit_xml):
    """test id -> passed | failed | error | skipped, from pytest's JUnit XML."""
    result = {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("error", "failure", "skipped") if k in kinds), "passed")
        result[f"{case.get('classname')}::{case.get('name')}"] = {"failure": "failed"}.get(outcome, outcome)
    return result


def run_suite(checkout, tests, keywords, spec, junit_xml):
    command = [sys.executable, "-m", "pytest", "-p", "memlab.peer", "-q", "-m", MARKERS,
               *(["-k", keywords] if keywords else []), "--junitxml", junit_xml, *tests]
    if spec:
        command.append(f"--memlab-switches={spec}")
    print(f"peer: {'stock' if not spec else spec}: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    env = dict(os.environ)
    # DeepSpeed's CPU accelerator counts NUMA nodes as devices unless LOCAL_SIZE says how many; the
    # tests skip themselves below their world size (2 for most offload tests)
    env.setdefault("LOCAL_SIZE", str(LOCAL_SIZE))
    oplocks.use_extensions_root(env)  # the ops memlab's set-up built, in both modes
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    subprocess.run(command, cwd=checkout, env=env, check=False)
    if not os.path.exists(junit_xml):
        raise SystemExit(f"peer: pytest wrote no results for {spec or 'stock'} (see its output above)")
    return outcomes(junit_xml)


def counts(result):
    return {k: sum(1 for v in result.values() if v == k) for k in ("passed", "failed", "error", "skipped")}


def difference(stock, switched):
    """Tests that pass stock and do not pass switched (a missing one included)."""
    return sorted(t for t, outcome in stock.items() if outcome == "passed" and switched.get(t) != "passed")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m memlab.peer", description=__doc__.split("\n\n")[2])
    parser.add_argument("checkout", help="a DeepSpeed source checkout (its tests/ folder is used)")
    parser.add_argument("tests", nargs="*", help="test paths in the checkout (default: DeepSpeed's ZeRO-3 offload "
                                                 "tests, narrowed by the default -k)")
    parser.add_argument("--switches", default="all",
                        help="switch sets to compare with stock, separated by ';' (default: all)")
    parser.add_argument("-k", dest="keywords", default=None,
                        help=f"pytest -k expression (default without named tests: {DEFAULT_KEYWORDS!r})")
    parser.add_argument("--out", default="peer-out", help="folder for the JUnit XML of each mode")
    args = parser.parse_args(argv)
    if not args.tests:  # named tests run as named; the default selection is narrowed to ZeRO-3 offload
        args.tests = list(DEFAULT_TESTS)
        args.keywords = args.keywords or DEFAULT_KEYWORDS
    checkout = os.path.abspath(args.checkout)
    if not os.path.isfile(os.path.join(checkout, "tests", "conftest.py")):
        parser.error(f"{checkout}: not a DeepSpeed checkout (no tests/conftest.py)")
    missing = [t for t in args.tests if not os.path.exists(os.path.join(checkout, t))]
    if missing:
        parser.error(f"not in the checkout: {', '.join(missing)}")
    from .engine import attached

    specs = [s.strip() for s in args.switches.split(";") if s.strip()]
    for spec in specs:
        attached.switch_values(spec)  # a bad name stops here, before any test runs
    os.makedirs(args.out, exist_ok=True)
    out = os.path.abspath(args.out)
    stock = run_suite(checkout, args.tests, args.keywords, None, os.path.join(out, "stock.xml"))
    if not stock:  # a comparison of nothing is no evidence
        raise SystemExit("peer: no test was selected (check the test paths and -k)")
    results = {spec: run_suite(checkout, args.tests, args.keywords, spec,
                               os.path.join(out, f"{spec.replace(',', '+')}.xml")) for spec in specs}
    print(f"\n{'mode':36s} {'passed':>7s} {'failed':>7s} {'error':>7s} {'skipped':>8s}")
    for name, result in [("stock", stock)] + list(results.items()):
        c = counts(result)
        print(f"{name:36s} {c['passed']:7d} {c['failed']:7d} {c['error']:7d} {c['skipped']:8d}")
    regressed = False
    for spec, result in results.items():
        lost = difference(stock, result)
        regressed |= bool(lost)
        print(f"\n{spec}: {len(lost)} test(s) pass stock and not with the switches")
        for test in lost:
            print(f"  {test}: {result.get(test, 'missing')}")
    return 1 if regressed else 0


if __name__ == "__main__":
    sys.exit(main())

"""ZeRO-3's contract beyond forward/backward/step, with every MemAscend switch:
tests/engine/contract_script.py (plain DeepSpeed, the switches installed as the
worker installs them) reads every fp32 master and Adam moment through
deepspeed.utils' safe_get_* calls, sets the largest master, reads and modifies
weights under GatheredParameters, trains with 2-micro-batch gradient
accumulation and saves the 16-bit model gathered whole. Each switch alone and all of them give stock's values exactly."""
import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from memlab.knobs import MEMASCEND_SWITCHES

pytestmark = pytest.mark.engine

SCRIPT = os.path.join(os.path.dirname(__file__), "contract_script.py")
VARIANTS = {"stock": ({}, "deepspeed"), "all": ({}, "memascend")}
VARIANTS.update({name: ({name: optimized}, "deepspeed") for name, (_, optimized) in MEMASCEND_SWITCHES.items()})


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    """variant -> what the script saw; two scripts at a time."""
    out, running = {}, []

    def finish(name, process):
        stdout, _ = process.communicate(timeout=600)
        lines = [line for line in stdout.splitlines() if line.startswith("CONTRACT ")]
        assert lines, f"{name}: the script printed no result:\n{stdout[-3000:]}"
        out[name] = json.loads(lines[-1][len("CONTRACT "):])

    for name, (switches, engine) in VARIANTS.items():
        if len(running) == 2:
            finish(*running.pop(0))
        folder = tmp_path_factory.mktemp(f"contract-{name}")
        running.append((name, subprocess.Popen([sys.executable, SCRIPT, str(folder), json.dumps(switches), engine],
                                               cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, env={**os.environ, "PYTHONPATH": ROOT})))
    for name, process in running:
        finish(name, process)
    return out


@pytest.mark.parametrize("variant", ["all"] + list(MEMASCEND_SWITCHES))
@pytest.mark.parametrize("what", ["losses", "fp32", "exp_avg", "set_read_back", "gathered", "saved_16bit"])
def test_stocks_values(seen, variant, what):
    assert seen[variant][what] == seen["stock"][what]

"""The GPU check's scripts on a tiny real run here (DeepSpeed's CPU accelerator):
scripts/gpu_runs.py and gpu_compare.py on its manifest, gpu_pin_check.py's native
pinning. The rest of memlab's CUDA paths: tests/unit/test_cuda_paths.py."""
import json
import os
import sys

import pytest
from helpers import SCRIPTS, gpu_compare, run_script, table_rows

from memlab import components as C
from memlab.sizing import MiB, page_round


@pytest.mark.engine
def test_compare_on_a_tiny_real_run_and_its_estimate(tmp_path):
    """scripts/gpu_runs.py as the GPU check calls it (estimate through the command
    line, then a real run through the check's worker), here on DeepSpeed's CPU
    accelerator with tiny-llama for one step; gpu_compare.py on its manifest."""
    work, swap = tmp_path / "work", tmp_path / "swap"
    swap.mkdir()
    done = run_script([sys.executable, os.path.join(SCRIPTS, "gpu_runs.py"), "runs", "--work", str(work),
                       "--model", "tiny-llama", "--steps", "1", "--configs", "stock", "--set", "run.seq_len=64",
                       "--gpus", "0", "--swap-dir", str(swap)], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((work / "manifest.json").read_text())
    entry = manifest["configs"]["stock"]
    assert entry["status"] == "ok" and entry["steps_done"] == 1
    run_dir, est_file = entry["run_dir"], entry["estimate"]
    with open(os.path.join(run_dir, "request.json")) as f:
        assert json.load(f)["knobs"]["run.seq_len"] == 64
    with open(os.path.join(run_dir, "worker.log")) as f:
        assert "gpu_runs worker: token batches on cpu" in f.read()  # the check's worker ran, not memlab's bare one
    est = json.loads(open(est_file).read())
    assert est["hardware"]["accelerator"] == "cpu" and est["gpu"] is None

    md, js = tmp_path / "cmp.md", tmp_path / "cmp.json"
    gpu_compare("--manifest", work / "manifest.json", "--md", md, "--json", js)
    text = md.read_text()
    assert table_rows(text, "Host bytes per component at the peak") == list(C.ALL)  # a row per component
    assert table_rows(text, "Runs") == ["stock"]
    assert "| stock | deepspeed | ok | 1 |" in text
    data = json.loads(js.read_text())
    measured, predicted = data["configs"]["stock"]["measured"], data["configs"]["stock"]["predicted"]
    assert measured["peak_rss_bytes"] > 0 and measured["gpu"]["peak_allocated"] is None
    assert set(predicted["components"]) == set(C.ALL)
    # the engine's pools and flat buffers: what the probes recorded is what sizing predicted, buffer for buffer
    for component in (C.PARAM_POOL, C.OPTIMIZER_POOL, C.GRAD_FLAT):
        assert measured["buffers"][component]["reserved"] == predicted["buffers"][component]["reserved"]
    rows = {line.split("|")[2].strip(): line for line in text.splitlines() if line.startswith("| stock | ")}
    assert "| yes |" in rows[C.PARAM_POOL]
    # the same table from explicit --config arguments
    again = gpu_compare("--config", "stock", run_dir, est_file).stdout
    assert table_rows(again, "Host bytes per component at the peak") == list(C.ALL)


@pytest.mark.engine
def test_pin_check_measures_native_pinning_on_the_cpu(tmp_path):
    """gpu_pin_check.py here: DeepSpeed's native backend is mlock on the CPU
    accelerator; VmLck grows by exactly what the probes and sizing say."""
    out = tmp_path / "pin.json"
    done = run_script([sys.executable, os.path.join(SCRIPTS, "gpu_pin_check.py"), "--backends", "native",
                       "--sizes", f"4097,{MiB + 1}", "--out", str(out)], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    native = json.loads(out.read_text())["backends"]["native"]
    assert native["accelerator"] == "cpu" and [r["requested"] for r in native["rows"]] == [4097, MiB + 1]
    for row in native["rows"]:
        assert row["probe_backend"] == "native-mlock"
        assert row["probe_reserved"] == row["sizing_reserved"] == row["measured"]["vm_lck"] == page_round(
            row["requested"])
    assert native["after_free"]["vm_lck"] == 0

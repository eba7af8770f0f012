"""Every refusal, proven in plain DeepSpeed; every configuration memlab used to
refuse but DeepSpeed runs, run.

- Each knob set memlab refuses is run by scripts/plain_deepspeed.py: DeepSpeed
  0.19.8 and transformers alone in a process (no memlab patches, probes or
  worker), the model built the way a Hugging Face Trainer script builds it.
  It must crash with the message memlab's refusal names, where memlab says.
- The configurations whose outcome depends on the model in ways memlab cannot
  yet decide (knobs.RISKS) are warned about and run: three that DeepSpeed
  runs train 3 steps through memlab, one that DeepSpeed asserts on ends
  `failed` with DeepSpeed's message and memlab's warning.
"""
import json
import os
import subprocess
import sys

import pytest
from helpers import UNALIGNED, run_together

from memlab import Knobs, KnobError, Lab, ModelSpec, oplocks
from memlab.ds_rules import cpu_fp16_supported
from memlab.knobs import ResolvedKnobs

pytestmark = pytest.mark.engine

PLAIN_DEEPSPEED = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts", "plain_deepspeed.py")
P = "zero_optimization.offload_param."
O = "zero_optimization.offload_optimizer."
# one decoder layer whose attention has four swapped tensors (q, k, v, o: 1 MiB each in fp32)
FOUR_IN_ATTENTION = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 512, "intermediate_size": 1024,
                     "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 8,
                     "max_position_embeddings": 256}

# name: (model, knobs, the knob memlab refuses, DeepSpeed's crash, phase, step)
REFUSED = {
    "buffer_size": ("tiny-llama", {P + "buffer_size": 1_000_000}, P + "buffer_size",
                    "More elements 2097152 than buffer size 1000000", "init", 0),
    "param_buffers": (FOUR_IN_ATTENTION, {P + "buffer_count": 3}, P + "buffer_count",
                      "Not enough buffers 3 for swapping 4", "init", 0),
    "optimizer_buffers": ("tiny-llama", {O + "buffer_count": 3}, O + "buffer_count",
                          "assert pinned_buffers is not None", "optimizer_step", 2),
    "fast_init": ("tiny-llama", {O + "fast_init": True, P + "buffer_size": 2_097_152,
                                 "zero_optimization.sub_group_size": 100_000_000}, O + "fast_init",
                  "is too small for initializing fp32 params", "init", 0),
    "fp16": ("tiny-llama", {"run.dtype": "fp16"}, "run.dtype", "Type fp16 is not supported on your device", "init", 0),
    "gds": ("tiny-llama", {"aio.use_gds": True}, "aio.use_gds", "GDS currently only supported for CUDA accelerator",
            "init", 0),
}


def plain_deepspeed_jobs(cases, folder, args=("--steps", "2")):
    """Start scripts/plain_deepspeed.py for each case (with `args`), two at a time; name -> its JSON result."""
    results, running = {}, []
    env = oplocks.use_extensions_root(dict(os.environ))  # the ops set-up built
    for index, (name, (model, knobs, *_)) in enumerate(cases.items()):
        spec = ModelSpec.resolve(model)
        resolved = ResolvedKnobs(Knobs(knobs), spec, accelerator="cpu", check=False)  # memlab would refuse it
        case = os.path.join(folder, name)
        os.makedirs(case)
        with open(os.path.join(case, "model.json"), "w") as f:
            json.dump(spec.config, f)
        with open(os.path.join(case, "ds_config.json"), "w") as f:
            json.dump(resolved.to_ds_config(os.path.join(case, "swap")), f)
        job_env = dict(env, MASTER_PORT=str(29700 + index))
        running.append((name, subprocess.Popen(
            [sys.executable, PLAIN_DEEPSPEED, os.path.join(case, "model.json"), os.path.join(case, "ds_config.json"),
             *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=job_env)))
        while len(running) == 2 or (running and index == len(cases) - 1):
            done_name, process = running.pop(0)
            out, _ = process.communicate(timeout=600)
            results[done_name] = json.loads(out.strip().splitlines()[-1])
    return results


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    cases = {name: case for name, case in REFUSED.items() if name != "fp16" or not cpu_fp16_supported()}
    return plain_deepspeed_jobs(cases, str(tmp_path_factory.mktemp("plain-deepspeed")))


def applies_here(name):
    # DeepSpeed's CPU accelerator runs fp16 on a CPU with oneDNN's fp16 kernels; memlab accepts it there
    if name == "fp16" and cpu_fp16_supported():
        return pytest.param(name, marks=pytest.mark.skip(reason="this CPU has fp16 kernels: DeepSpeed runs fp16 "
                                                                "and memlab accepts it"))
    return name


@pytest.mark.parametrize("name", [applies_here(name) for name in REFUSED])
def test_each_refusal_is_the_crash_plain_deepspeed_shows(plain, name):
    model, knobs, knob, crash, phase, step = REFUSED[name]
    with pytest.raises(KnobError) as refused:
        Knobs(knobs).resolve(ModelSpec.resolve(model), accelerator="cpu")
    assert refused.value.knob == knob
    result = plain[name]
    assert result["ok"] is False, f"plain DeepSpeed ran it: {result}"
    assert crash in result["error"] + "\n".join(result["traceback"]), result
    assert (result["phase"], result["step"]) == (phase, step), result


# Configurations memlab refused until these were run in plain DeepSpeed (3 steps each there too):
# name: (model, knobs, whether DeepSpeed runs it)
RISKS = {
    # the case: real parameter swapping, live parameters and a small prefetch bucket
    "live_parameters": ("small-llama", {"zero_optimization.stage3_max_live_parameters": 10**7,
                                        "zero_optimization.stage3_prefetch_bucket_size": 10**6}, True),
    "reuse_distance": ("small-llama", {"zero_optimization.stage3_max_reuse_distance": 10**7}, True),
    "pipelined": ("tiny-llama", {O + "pipeline_read": True, O + "pipeline_write": True, O + "buffer_count": 8}, True),
    # and one the same rule is right about: read-ahead swaps in a parameter still held
    "live_parameters_tiny": ("tiny-llama", {"zero_optimization.stage3_max_live_parameters": 10**7}, False),
}


@pytest.fixture(scope="module")
def risky_runs(tmp_path_factory):
    lab = Lab(tmp_path_factory.mktemp("risks"))
    jobs = [({**knobs, "run.steps": 3}, model) for model, knobs, _ in RISKS.values()]
    with pytest.warns(UserWarning, match="running it"):
        runs = run_together(lab, jobs)
    return dict(zip(RISKS, runs))


@pytest.mark.parametrize("name", list(RISKS))
def test_a_risk_is_warned_about_and_run(risky_runs, name):
    model, knobs, runs = RISKS[name]
    assert Knobs(knobs).resolve(ModelSpec.resolve(model)).risks  # warned about, not refused
    run = risky_runs[name]
    if runs:
        assert run.summary["status"] == "ok", run.summary["error"]
        assert len(run.summary["losses"]) == 3
    else:
        assert run.summary["status"] == "failed"
        assert "already assigned swap buffer" in run.summary["error"]  # DeepSpeed's message
        assert "; memlab warned: zero_optimization.stage3_max_live_parameters=10000000" in run.summary["error"]


def test_the_stale_gradient_warning_names_what_plain_deepspeed_misreads(tmp_path):
    """memlab warns (knobs._risk_stale_gradients) that stock DeepSpeed steps some parameters on stale
    gradients with the optimizer on NVMe. Plain DeepSpeed, one step with the optimizer on NVMe and one
    with it on the CPU (the same CPU Adam, nothing swapped): the parameters whose fp32 masters differ
    are exactly those memlab names (ds_rules.stale_gradient_reads), and they are most of them."""
    from memlab.ds_rules import stale_gradient_reads

    knobs = {"zero_optimization.sub_group_size": 10**9}
    cases = {"nvme": (UNALIGNED, knobs), "cpu": (UNALIGNED, {**knobs, O + "device": "cpu"})}
    results = plain_deepspeed_jobs(cases, str(tmp_path), args=("--steps", "1", "--masters"))
    assert results["nvme"]["ok"] and results["cpu"]["ok"], results
    nvme, cpu = results["nvme"]["masters"], results["cpu"]["masters"]
    differ = sorted(name for name in cpu if nvme[name] != cpu[name])
    resolved = Knobs(knobs).resolve(ModelSpec.resolve(UNALIGNED))
    tensors = resolved.model.tensors()
    named = sorted(tensors[i].name for i in stale_gradient_reads(
        [t.numel for t in tensors], resolved["zero_optimization.sub_group_size"], resolved["aio.block_size"]))
    assert differ == named and len(named) > len(tensors) / 3
    (risk,) = [r for r in resolved.risks if r.knob == O + "device"]
    assert f"{len(named)} of {len(tensors)} parameters" in str(risk) and risk.crash is None
    assert not [r for r in Knobs(knobs, engine="memascend").resolve(resolved.model).risks if r.knob == O + "device"]

"""The other side of bad input: knob sets validation accepts, drawn at random
with a fixed seed, really run (two steps each). A set memlab accepts without a
warning runs without crashing DeepSpeed; one it warns about (a risk it cannot
decide from the model) either runs or ends failed with DeepSpeed's message
followed by memlab's warning."""
import json

import pytest
from helpers import run_together

from memlab import Knobs, KnobError, Lab, ModelSpec

CHOICES = {
    "zero_optimization.offload_param.device": ["nvme", "cpu"],
    "zero_optimization.offload_optimizer.device": ["nvme", "cpu"],
    "zero_optimization.offload_param.buffer_count": [1, 2, 4, 5, 8],
    "zero_optimization.offload_optimizer.buffer_count": [3, 4, 8, 12],
    "zero_optimization.offload_optimizer.pipeline_read": [False, True],
    "zero_optimization.stage3_max_live_parameters": [0, 0, 10**6, 10**9],
    "zero_optimization.stage3_max_reuse_distance": [0, 0, 10**9],
    "zero_optimization.stage3_prefetch_bucket_size": [0, 10**5, 5 * 10**7],
    "zero_optimization.sub_group_size": ["auto", 10**6, 10**9],
    "zero_optimization.offload_param.buffer_size": ["auto", 3 * 10**6],
    "aio.block_size": [2**20, 2**21],
    "run.micro_batch": [1, 2],
    "run.seq_len": [32, 64],
    "run.gradient_checkpointing": [False, True],
    "memascend.pool": ["fixed", "adaptive"],
    "memascend.optimizer_staging": ["stock", "bounded"],
    "memascend.storage": ["files", "direct"],
}
MODELS = ["tiny-llama"] * 3 + ["small-llama"]  # small-llama swaps 30 tensors: the pool is really exercised
SAMPLES = 24


def accepted_samples(count=SAMPLES, seed=1):
    """(model, knob set, risky) triples validation accepts, drawn at random with a fixed seed."""
    import random

    rng = random.Random(seed)
    accepted = []
    while len(accepted) < count:
        model = rng.choice(MODELS)
        values = {name: rng.choice(options) for name, options in CHOICES.items()}
        try:
            resolved = Knobs({**values, "run.steps": 2}).resolve(ModelSpec.resolve(model))
        except KnobError:
            continue
        accepted.append((model, values, bool(resolved.risks)))
    return accepted


@pytest.fixture(scope="module")
def sample_runs(tmp_path_factory):
    """Every sample run, two at a time. Two steps: every DeepSpeed crash of this kind shows at step 2,
    the first step after the engine has recorded the parameter order."""
    lab = Lab(tmp_path_factory.mktemp("store"))
    return run_together(lab, [({**values, "run.steps": 2}, model) for model, values, _ in accepted_samples()])


@pytest.mark.engine
@pytest.mark.parametrize("index", range(SAMPLES))
def test_accepted_knob_sets_run_without_crashing(sample_runs, index):
    model, values, risky = accepted_samples()[index]
    run = sample_runs[index]
    if risky and run.summary["status"] == "failed":
        assert "; memlab warned: " in run.summary["error"], run.summary["error"]
        return
    assert run.summary["status"] == "ok", f"{model} {json.dumps(values)}: {run.summary['error']}"

"""The configs people have, run for real: the Hugging Face Trainer's ZeRO-3 NVMe
example as its docs give it ("auto" values, the old aio.thread_count and all)."""
import warnings

import pytest
from helpers import HF_TRAINER_CONFIG

from memlab import Knobs
from memlab.sizing import estimate

pytestmark = pytest.mark.engine



def test_the_hf_trainer_example_config_is_estimated_and_runs_unchanged(lab, swap):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # aio.thread_count's hint, checked in the unit tests
        knobs = Knobs.from_ds_config(HF_TRAINER_CONFIG).set({"run.steps": 2, "run.swap_dir": str(swap)})
    predicted = estimate("tiny-llama", knobs)
    run = lab.run(knobs, model="tiny-llama", wait=True)
    assert run.summary["status"] == "ok", run.summary["error"]
    assert len(run.summary["losses"]) == 2
    pool = sum(a["reserved"] for a in run.allocations if a["component"] == "param_pool")
    assert pool == sum(b.reserved for b in predicted.buffers if b.component == "param_pool")

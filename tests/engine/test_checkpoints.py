"""DeepSpeed checkpoints with every MemAscend switch: save at step 2
(`run.save_checkpoint_at`), load into a fresh engine (`run.resume_from`),
train 2 more steps; the four losses equal stock DeepSpeed's round trip exactly
(fp32, CPU accelerator, fixed seed), for each switch alone and for all of them.

Stock's own round trip with the optimizer on NVMe is not the uninterrupted
run: DeepSpeed 0.19.8 copies the optimizer's swap files into the checkpoint
and back, but not CPU Adam's step counts, and a fresh engine registers only
the fp32 masters with its swapper, so the moments the checkpoint holds are
not read back: Adam restarts at step 1 from zero moments. The step after the
load (from the restored weights) is the uninterrupted run's; the one after
that is not. memlab's switches keep stock's behaviour, that included; the
test pins both facts.
"""
import os

import pytest
from helpers import run_together

from memlab import Knobs, Lab
from memlab.knobs import MEMASCEND_SWITCHES

pytestmark = pytest.mark.engine

# The tied Qwen2 whose embedding (8.4M elements) is a sub-group larger than the
# staging bound: bounded staging streams it, direct storage holds every tensor.
STREAMED = {"model_type": "qwen2", "vocab_size": 32768, "hidden_size": 256, "intermediate_size": 688,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "tie_word_embeddings": True, "max_position_embeddings": 512}
VARIANTS = {"stock": Knobs(), "all": Knobs(engine="memascend")}
VARIANTS.update({name: Knobs({name: optimized}) for name, (_, optimized) in MEMASCEND_SWITCHES.items()})


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """variant -> (saving run, resumed run); and the uninterrupted stock run under None."""
    lab = Lab(tmp_path_factory.mktemp("store"))
    folders = {name: str(tmp_path_factory.mktemp(f"checkpoint-{name}")) for name in VARIANTS}
    saves = run_together(lab, [(knobs.set({"run.steps": 2, "run.save_checkpoint_at": 2,
                                           "run.checkpoint_dir": folders[name]}), STREAMED)
                               for name, knobs in VARIANTS.items()] + [(Knobs().set(steps=4), STREAMED)])
    *saves, uninterrupted = saves
    resumes = run_together(lab, [(knobs.set({"run.steps": 2, "run.resume_from": folders[name]}), STREAMED)
                                 for name, knobs in VARIANTS.items()])
    out = {None: (uninterrupted, None)}
    for name, save, resume in zip(VARIANTS, saves, resumes):
        for run in (save, resume):
            assert run.summary["status"] == "ok", f"{name}: {run.summary['error']}"
        out[name] = (save, resume)
    return out, folders


def losses(pair):
    save, resume = pair
    return save.summary["losses"] + resume.summary["losses"]


def test_stock_resumes_from_the_restored_weights_but_restarts_adam(round_trips):
    runs, _ = round_trips
    uninterrupted = runs[None][0].summary["losses"]
    stock = losses(runs["stock"])
    assert stock[:3] == uninterrupted[:3]  # steps 1-2 saved, step 3 from the loaded weights
    assert stock[3] != uninterrupted[3]  # Adam's step counts and moments were not restored


@pytest.mark.parametrize("variant", ["all"] + list(MEMASCEND_SWITCHES))
def test_the_round_trip_gives_stocks_losses(round_trips, variant):
    runs, _ = round_trips
    assert losses(runs[variant]) == losses(runs["stock"])


@pytest.mark.parametrize("variant, files_kept_by", [("memascend.storage", "stock"),
                                                   ("all", "memascend.optimizer_staging")])
def test_a_direct_storage_checkpoint_holds_the_files_kept_without_it(round_trips, variant, files_kept_by):
    # the optimizer's tensors are written out as the files the swap folder holds without direct storage
    # (same names, same sizes): the checkpoint is the same either way, and the region is not copied
    _, folders = round_trips

    def offloaded(folder):
        out = {}
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                if "offloaded_tensors" in path:
                    out[os.path.relpath(path, folder)] = os.path.getsize(path)
        return out

    assert offloaded(folders[files_kept_by]) and offloaded(folders[variant]) == offloaded(folders[files_kept_by])

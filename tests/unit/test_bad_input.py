"""Bad input at every entry point: one line naming the field, the value and the
reason, memlab's own error type, and nothing started. That the knob sets
validation accepts really run: tests/engine/test_bad_input_runs.py."""
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memlab import Knobs, KnobError, Lab, ModelSpec, ModelSpecError, load_run
from memlab.knobs import SPECS
from memlab.runs import RunStoreError

MEMLAB_ERRORS = (KnobError, ModelSpecError)
NAMES = [s.name for s in SPECS] + ["memascend.pool", "memascend.pinning", "memascend.grad_checks",
                                   "memascend.optimizer_staging", "memascend.storage"]
ANY_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                      st.text(max_size=12), st.sampled_from(["auto", "1e8", "true", "nvme", "cpu", "6GiB", "-1"]),
                      st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                           max_size=2))
KNOB_NAME = st.one_of(st.sampled_from(NAMES), st.text(max_size=30))
TINY = ModelSpec.resolve("tiny-llama")


def one_line(exc):
    text = str(exc)
    return text and "\n" not in text


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KNOB_NAME, ANY_VALUE, max_size=6), st.sampled_from(["deepspeed", "memascend", "custom", "x"]))
def test_knob_validation_raises_only_memlab_errors(values, engine):
    try:
        Knobs(values, engine=engine).resolve(TINY)
    except MEMLAB_ERRORS as exc:
        assert one_line(exc), exc


CONFIG_FIELD = st.sampled_from(["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                                "attention_bias", "max_position_embeddings", "rms_norm_eps"])


@settings(max_examples=1500, deadline=None)
@given(st.dictionaries(CONFIG_FIELD, ANY_VALUE, max_size=6))
def test_model_configs_raise_only_memlab_errors(overrides):
    config = {**TINY.config, **overrides}
    try:
        ModelSpec.resolve(config)
    except ModelSpecError as exc:
        assert one_line(exc), exc


@settings(max_examples=1000, deadline=None)
@given(st.dictionaries(st.sampled_from(["zero_optimization", "aio", "optimizer", "bf16", "data_types",
                                        "train_micro_batch_size_per_gpu", "gradient_clipping"]),
                       st.one_of(ANY_VALUE, st.fixed_dictionaries(
                           {"stage": st.sampled_from([3, 2, None]),
                            "offload_param": st.fixed_dictionaries({"device": st.sampled_from(["nvme", "cpu", "x"])})}
                       )), max_size=4))
def test_pasted_ds_configs_raise_only_memlab_errors(config):
    try:
        Knobs.from_ds_config(config).resolve(TINY)
    except MEMLAB_ERRORS as exc:
        assert one_line(exc), exc


@pytest.mark.parametrize("values, field", [
    ({"zero_optimization.offload_param.buffer_count": -3}, "zero_optimization.offload_param.buffer_count"),
    ({"zero_optimization.offload_param.buffer_size": 0}, "zero_optimization.offload_param.buffer_size"),
    ({"aio.block_size": "big"}, "aio.block_size"),
    ({"zero_optimization.offload_param.buffer_size": 1000}, "zero_optimization.offload_param.buffer_size"),
    ({"run.budget": "lots"}, "run.budget"),
    ({"run.swap_dir": "/proc/memlab-cannot-be-here"}, "run.swap_dir"),
    ({"run.steps": True}, "run.steps"),
])
def test_lab_run_refuses_before_starting_anything(tmp_path, values, field):
    lab = Lab(tmp_path / "store")
    with pytest.raises(KnobError) as info:
        lab.run(values)
    assert info.value.knob == field and one_line(info.value)
    assert os.listdir(tmp_path / "store") == []  # no run folder, no worker


def test_unknown_knob_suggests_the_closest():
    with pytest.raises(KnobError, match="did you mean 'zero_optimization.offload_param.buffer_count'"):
        Knobs({"zero_optimization.offload_param.bufer_count": 3})


def test_swap_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KnobError, match="run.swap_dir=.*cannot create it"):
        Lab(tmp_path / "store").run({"run.swap_dir": str(tmp_path / "file")})


@pytest.fixture
def ramfs(tmp_path):
    """ramfs: a real file system without O_DIRECT (needs root to mount)."""
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount_point)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a ramfs here (not root?)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_swap_dir_without_o_direct_is_refused(ramfs, tmp_path):
    with pytest.raises(KnobError, match="does not support O_DIRECT"):
        Lab(tmp_path / "store").run({"run.swap_dir": str(ramfs)})
    assert os.listdir(ramfs) == []  # the probe file is gone


def test_swap_dir_holding_foreign_files_is_refused_and_left_alone(tmp_path):
    root = tmp_path / "swap"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(KnobError, match="holds files memlab did not create \\('notes.txt'\\)"):
        Lab(tmp_path / "store").run({"run.swap_dir": str(root)})
    assert (root / "notes.txt").read_text() == "mine"


def test_bad_config_json_and_checkpoint_folder(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelSpecError) as info:
        ModelSpec.resolve(str(tmp_path / "config.json"))
    assert "config.json" in str(info.value) and one_line(info.value)
    with pytest.raises(ModelSpecError, match="no-such-model"):
        ModelSpec.resolve(str(tmp_path / "no-such-model"))


def test_load_run_of_a_bad_folder(tmp_path):
    with pytest.raises(RunStoreError, match="no such run folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunStoreError, match="not a memlab run"):
        load_run(tmp_path / "empty")


@pytest.mark.parametrize("argv, needle", [
    (["run", "--set", "aio.block_size=huge"], "aio.block_size='huge'"),
    (["run", "--model", "tiny-lama"], "tiny-llama"),
    (["run", "--knobs", "/no/such/ds_config.json"], "no such file"),
    (["run", "--budget=-5GiB"], "run.budget"),
    (["run", "--steps", "many"], "--steps"),
    (["run", "--set", "nonsense"], "expected KEY=VALUE"),
    (["report", "/no/such/run"], "no such run folder"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, argv, needle):
    result = subprocess.run([sys.executable, "-m", "memlab.cli", *argv, *(["--out", str(tmp_path)]
                                                                         if argv[0] == "run" else [])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("memlab: error:") and needle in lines[0], result.stderr
    assert not [p for p in os.listdir(tmp_path) if os.path.isdir(tmp_path / p)]


def test_preflight_warns_when_the_estimate_exceeds_the_budget(tmp_path):
    from memlab.lab import warn_if_over_budget

    lab = Lab(tmp_path / "store")
    with pytest.warns(UserWarning, match="the estimate for this run peaks at .* over its 500.0 MiB budget"):
        warn_if_over_budget(*lab.plan({"run.budget": "500MiB"}))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_over_budget(*lab.plan({"run.budget": "8GiB"}))  # fits: silent

"""Knobs: defaults, coercion, bounds, ds_config in and out, "auto" and the traps.

Pure: no DeepSpeed, no torch. CUDA presence is monkeypatched where a check
depends on it, so the results do not depend on the machine.
"""
import json
import math
import pathlib

import pytest
from helpers import HF_TRAINER_CONFIG

import memlab.knobs as K
from memlab.knobs import AUTO, KnobError, Knobs, ResolvedKnobs
from memlab.models import ModelSpec

TINY = ModelSpec.resolve("tiny-llama")
SMALL = ModelSpec.resolve("small-llama")
TINY_LARGEST = 8192 * 256  # model.embed_tokens.weight
SMALL_LARGEST = 32000 * 512

# Qwen2 hard-codes biases on q/k/v: those modules own two parameters each.
QWEN2_BIASES = {
    "model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
}
# A llama whose largest tensor is an MLP projection, not the embedding.
WIDE_MLP_LLAMA = {
    "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 4096,
    "num_hidden_layers": 2, "num_attention_heads": 4,
}

P = "zero_optimization.offload_param."
O = "zero_optimization.offload_optimizer."
Z = "zero_optimization."

# Every knob and its default. DeepSpeed 0.19.8's defaults (zero/offload_config.py
# DeepSpeedZeroOffload{Param,Optimizer}Config, zero/config.py DeepSpeedZeroConfig,
# swap_tensor/aio_config.py AIO_DEFAULT_DICT) except where memlab deliberately
# differs; those are listed in DS_DEFAULTS below.
EXPECTED_DEFAULTS = {
    P + "device": "nvme",
    P + "buffer_count": 5,
    P + "buffer_size": "auto",
    P + "max_in_cpu": 0,
    P + "pin_memory": True,
    O + "device": "nvme",
    O + "buffer_count": 4,
    O + "pin_memory": True,
    O + "pipeline_read": False,
    O + "pipeline_write": False,
    O + "fast_init": False,
    O + "ratio": 1.0,
    Z + "sub_group_size": "auto",
    Z + "stage3_max_live_parameters": 0,
    Z + "stage3_max_reuse_distance": 0,
    Z + "stage3_prefetch_bucket_size": 50_000_000,
    Z + "stage3_param_persistence_threshold": 100_000,
    Z + "reduce_bucket_size": "auto",
    Z + "contiguous_gradients": True,
    "aio.block_size": 1048576,
    "aio.queue_depth": 8,
    "aio.intra_op_parallelism": 1,
    "aio.single_submit": False,
    "aio.overlap_events": True,
    "aio.use_gds": False,
    "data_types.grad_accum_dtype": None,
    "run.micro_batch": 1,
    "run.seq_len": 128,
    "run.dtype": "auto",
    "run.attn_implementation": "auto",
    "run.steps": 3,
    "run.grad_accum": 1,
    "run.gradient_checkpointing": False,
    "run.seed": 0,
    "run.lr": 1e-4,
    "run.swap_dir": None,
    "run.ranks": 1,
    "run.hostfile": None,
    "run.budget": None,
    "run.save_checkpoint_at": 0,
    "run.checkpoint_dir": None,
    "run.resume_from": None,
    "run.telemetry": True,
    "run.sample_hz": 13.0,
    "memascend.staging_elements": "auto",
    "memascend.storage_device": None,
    "allocator.DS_PIN_MEMORY_BACKEND": "torch",
    "allocator.MALLOC_ARENA_MAX": None,
    "allocator.MALLOC_TRIM_THRESHOLD_": None,
    "allocator.MALLOC_MMAP_THRESHOLD_": None,
    "allocator.malloc_trim": "never",
}
# DeepSpeed's own default for every knob where memlab's default differs (the traps).
DS_DEFAULTS = {
    P + "buffer_size": int(1e8),
    P + "max_in_cpu": int(1e9),
    Z + "sub_group_size": int(1e9),
    Z + "stage3_max_live_parameters": int(1e9),
    Z + "stage3_max_reuse_distance": int(1e9),
    Z + "reduce_bucket_size": int(5e8),
}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(K, "_cuda_present", lambda: False)


@pytest.fixture
def cuda(monkeypatch):
    monkeypatch.setattr(K, "_cuda_present", lambda: True)


def knob_error(values, model=TINY):
    """The KnobError that resolving `values` against `model` raises."""
    with pytest.raises(KnobError) as info:
        Knobs(values).resolve(model)
    return info.value


# ------------------------------------------------------------------ defaults

def test_every_knob_has_its_default():
    flat = Knobs().flat()
    assert {n: v for n, v in flat.items() if n in K.SPEC_BY_NAME} == EXPECTED_DEFAULTS
    # besides the specs, only the memascend.* switches, each at DeepSpeed's behaviour
    assert {n: v for n, v in flat.items() if n not in K.SPEC_BY_NAME} == {
        name: stock for name, (stock, _) in K.MEMASCEND_SWITCHES.items()}
    assert [s.name for s in K.SPECS] == list(EXPECTED_DEFAULTS)
    for name, default in EXPECTED_DEFAULTS.items():
        assert Knobs()[name] == default, name


def test_memlab_defaults_that_differ_from_deepspeed_record_deepspeeds():
    differing = {s.name: s.ds_default for s in K.SPECS if s.ds_default is not None}
    assert differing == DS_DEFAULTS


def test_auto_knobs_are_the_element_sized_ones_the_dtype_and_the_attention():
    assert {s.name for s in K.SPECS if s.auto} == {P + "buffer_size", Z + "sub_group_size", Z + "reduce_bucket_size",
                                                   "memascend.staging_elements", "run.dtype",
                                                   "run.attn_implementation"}


def test_default_engine_is_deepspeed():
    assert Knobs().engine == "deepspeed"


# ------------------------------------------------------------------ coercion

@pytest.mark.parametrize("name, given, expected", [
    ("aio.queue_depth", "4", 4),
    ("aio.queue_depth", "4.0", 4),
    ("aio.queue_depth", 4.0, 4),
    (Z + "stage3_prefetch_bucket_size", "1e8", 100_000_000),
    (Z + "stage3_prefetch_bucket_size", 1e8, 100_000_000),
    (Z + "stage3_prefetch_bucket_size", "1E7", 10_000_000),
    (P + "max_in_cpu", 1e9, 1_000_000_000),
    (P + "buffer_size", "auto", "auto"),
    (P + "buffer_size", "2e6", 2_000_000),
    ("allocator.MALLOC_ARENA_MAX", "2", 2),
    ("allocator.MALLOC_ARENA_MAX", None, None),
    ("aio.single_submit", "true", True),
    ("aio.single_submit", "FALSE", False),
    ("aio.single_submit", "True", True),
    ("aio.overlap_events", False, False),
    ("run.lr", "3e-5", 3e-5),
    ("run.lr", 1, 1.0),
    (O + "ratio", "0.5", 0.5),
    ("run.dtype", "bf16", "bf16"),
    ("data_types.grad_accum_dtype", "fp32", "fp32"),
    ("data_types.grad_accum_dtype", None, None),
    ("run.swap_dir", pathlib.PurePosixPath("/scratch/swap"), "/scratch/swap"),
])
def test_values_are_coerced(name, given, expected):
    value = Knobs({name: given})[name]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize("name, given, reason", [
    ("aio.queue_depth", 1.5, "must be a whole number"),
    ("aio.queue_depth", True, "must be a whole number, not a boolean"),
    ("aio.queue_depth", False, "must be a whole number, not a boolean"),
    ("aio.queue_depth", float("nan"), "must be a whole number"),
    ("aio.queue_depth", float("inf"), "must be a whole number"),
    ("aio.queue_depth", "four", "must be a whole number"),
    ("aio.queue_depth", "nan", "must be a whole number"),
    ("aio.queue_depth", "auto", "must be a whole number"),  # not an auto knob
    ("aio.queue_depth", [4], "must be a whole number"),
    (P + "buffer_size", "big", "must be a whole number or 'auto'"),
    (P + "buffer_count", None, "must be set (None is not allowed)"),
    ("run.lr", float("nan"), "must be a finite number"),
    ("run.lr", float("inf"), "must be a finite number"),
    ("run.lr", float("-inf"), "must be a finite number"),
    ("run.lr", True, "must be a number, not a boolean"),
    ("run.lr", "fast", "must be a number"),
    ("aio.single_submit", 1, "must be true or false"),
    ("aio.single_submit", "yes", "must be true or false"),
    ("run.dtype", "fp64", "must be one of fp32, bf16, fp16"),
    (P + "device", "disk", "must be one of nvme, cpu, none"),
    (O + "device", "none", "must be one of nvme, cpu"),
    ("allocator.malloc_trim", "always", "must be one of never, each_step"),
    ("run.swap_dir", "", "must not be empty"),
    ("run.swap_dir", 5, "must be a path"),
])
def test_bad_values_are_rejected_naming_the_knob(name, given, reason):
    with pytest.raises(KnobError) as info:
        Knobs({name: given})
    err = info.value
    assert err.knob == name
    assert err.reason == reason
    msg = str(err)
    assert msg.startswith(f"{name}=")
    assert msg.endswith(f": {reason}")
    assert "\n" not in msg


def test_knob_error_message_format():
    with pytest.raises(KnobError) as info:
        Knobs({"aio.queue_depth": 1.5})
    assert str(info.value) == "aio.queue_depth=1.5: must be a whole number"
    assert info.value.value == 1.5
    assert isinstance(info.value, ValueError)


def test_nan_is_rejected_as_an_int():
    with pytest.raises(KnobError) as info:
        Knobs({"run.steps": float("nan")})
    assert math.isnan(info.value.value)
    assert str(info.value) == "run.steps=nan: must be a whole number"


# ------------------------------------------------------------------ bounds

@pytest.mark.parametrize("name, value, reason", [
    (P + "buffer_count", 0, "must be at least 1"),
    (O + "buffer_count", 0, "must be at least 1"),
    (P + "buffer_size", 0, "must be at least 1"),
    (P + "max_in_cpu", -1, "must be at least 0"),
    (Z + "stage3_max_reuse_distance", -1, "must be at least 0"),
    ("aio.block_size", 4095, "must be at least 4096"),
    ("aio.intra_op_parallelism", 65, "must be at most 64"),
    ("aio.intra_op_parallelism", 0, "must be at least 1"),
    (O + "ratio", 1.5, "must be at most 1"),
    (O + "ratio", -0.1, "must be at least 0"),
    ("run.sample_hz", 0.5, "must be at least 1"),
    ("run.sample_hz", 51.0, "must be at most 50"),
    ("run.seq_len", 1, "must be at least 2"),
    ("run.micro_batch", 0, "must be at least 1"),
    ("run.lr", -1e-4, "must be at least 0"),
    ("allocator.MALLOC_ARENA_MAX", 0, "must be at least 1"),
])
def test_bounds_are_enforced_naming_the_knob(name, value, reason):
    with pytest.raises(KnobError) as info:
        Knobs({name: value})
    assert str(info.value) == f"{name}={value!r}: {reason}"


@pytest.mark.parametrize("name, value", [
    (P + "buffer_count", 1), ("aio.block_size", 4096), ("aio.intra_op_parallelism", 64),
    (O + "ratio", 0.0), (O + "ratio", 1.0), ("run.sample_hz", 1.0), ("run.sample_hz", 50.0),
    ("run.seq_len", 2), (P + "max_in_cpu", 0), ("run.lr", 0.0),
])
def test_bounds_are_inclusive(name, value):
    assert Knobs({name: value})[name] == value


def test_bounds_apply_after_string_coercion():
    with pytest.raises(KnobError) as info:
        Knobs({"aio.block_size": "1e3"})
    assert str(info.value) == "aio.block_size=1000: must be at least 4096"


# ------------------------------------------------------------------ unknown knobs

def test_unknown_knob_suggests_the_closest():
    with pytest.raises(KnobError) as info:
        Knobs({"aio.block_sise": 4096})
    assert str(info.value) == "aio.block_sise=4096: unknown knob; did you mean 'aio.block_size'?"
    assert info.value.knob == "aio.block_sise"


def test_unknown_nested_knob_suggests_the_closest():
    with pytest.raises(KnobError) as info:
        Knobs({"zero_optimization": {"offload_param": {"bufer_count": 3}}})
    assert str(info.value) == (
        f"{P}bufer_count=3: unknown knob; did you mean '{P}buffer_count'?")


def test_unknown_knob_without_a_close_match_has_no_suggestion():
    with pytest.raises(KnobError) as info:
        Knobs({"totally.unrelated.zzz": 1})
    assert str(info.value) == "totally.unrelated.zzz=1: unknown knob"


def test_unknown_run_keyword_suggests_the_closest():
    with pytest.raises(KnobError) as info:
        Knobs(step=5)
    assert str(info.value) == "run.step=5: unknown knob; did you mean 'run.steps'?"


def test_getitem_unknown_knob_suggests():
    with pytest.raises(KnobError) as info:
        Knobs()["aio.queue_dept"]
    assert str(info.value) == "aio.queue_dept=None: unknown knob; did you mean 'aio.queue_depth'?"


def test_get_returns_default_for_unknown():
    assert Knobs().get("nope", 7) == 7
    assert Knobs().get("run.steps") == 3


# ------------------------------------------------------------------ construction, set, diff

def test_nested_and_flat_and_keyword_values():
    k = Knobs({"aio": {"block_size": 8192}, "run.steps": 7}, seq_len=64)
    assert (k["aio.block_size"], k["run.steps"], k["run.seq_len"]) == (8192, 7, 64)
    assert Knobs.diff(Knobs(), k) == {"aio.block_size": (1048576, 8192), "run.steps": (3, 7), "run.seq_len": (128, 64)}


def test_bad_engine_is_rejected():
    with pytest.raises(KnobError) as info:
        Knobs(engine="bogus")
    assert str(info.value) == "engine='bogus': must be one of deepspeed, memascend, custom"


def test_memascend_engine_without_any_switch_is_refused(monkeypatch):
    monkeypatch.setattr(K, "MEMASCEND_SWITCHES", {})
    with pytest.raises(KnobError) as info:
        Knobs(engine="memascend")
    assert str(info.value) == "engine='memascend': no MemAscend optimization is available in this version"


def test_engine_follows_the_memascend_switches(monkeypatch):
    monkeypatch.setattr(K, "MEMASCEND_SWITCHES", {"memascend.pool": ("fixed", "adaptive"),
                                                  "memascend.pinning": ("torch", "aligned")})
    stock = Knobs()
    assert stock.engine == "deepspeed"
    assert (stock["memascend.pool"], stock["memascend.pinning"]) == ("fixed", "torch")
    on = Knobs(engine="memascend")
    assert on.engine == "memascend"
    assert (on["memascend.pool"], on["memascend.pinning"]) == ("adaptive", "aligned")
    assert on.set(steps=2).engine == "memascend"  # set keeps the switches
    assert Knobs.from_dict(on.to_dict()) == on
    mixed = Knobs({"memascend.pool": "adaptive"})
    assert mixed.engine == "custom"
    assert mixed.to_dict()["engine"] == "custom"
    with pytest.raises(KnobError) as info:
        Knobs({"memascend.pool": "huge"})
    assert str(info.value) == "memascend.pool='huge': must be 'fixed' (DeepSpeed's behaviour) or 'adaptive'"


def test_set_returns_a_new_object_and_leaves_the_original():
    original = Knobs(passthrough={"gradient_clipping": 1.0})
    before = original.flat()
    changed = original.set({"aio.block_size": 2 ** 21}, steps=9)
    assert changed is not original
    assert original.flat() == before
    assert original["aio.block_size"] == 1048576 and original["run.steps"] == 3
    assert changed["aio.block_size"] == 2 ** 21 and changed["run.steps"] == 9
    assert changed.passthrough == {"gradient_clipping": 1.0}
    assert original.diff(changed) == {"aio.block_size": (1048576, 2 ** 21), "run.steps": (3, 9)}


def test_set_accepts_nested_dicts():
    k = Knobs().set({"zero_optimization": {"offload_param": {"buffer_count": 8}}})
    assert k[P + "buffer_count"] == 8
    assert Knobs().diff(k) == {P + "buffer_count": (5, 8)}


def test_set_validates_and_leaves_original_on_error():
    k = Knobs(steps=4)
    with pytest.raises(KnobError):
        k.set(steps=0)
    assert k["run.steps"] == 4


def test_flat_is_a_copy():
    k = Knobs()
    k.flat()["run.steps"] = 99
    assert k["run.steps"] == 3


def test_diff():
    a = Knobs({"run.dtype": "bf16", "aio.queue_depth": 16})
    b = Knobs({"aio.queue_depth": 32})
    assert a.diff(b) == {"run.dtype": ("bf16", "auto"), "aio.queue_depth": (16, 32)}
    assert b.diff(a) == {"run.dtype": ("auto", "bf16"), "aio.queue_depth": (32, 16)}
    assert a.diff(a) == {}
    assert Knobs().diff(Knobs()) == {}


def test_equality_includes_passthrough():
    assert Knobs() == Knobs()
    assert Knobs(steps=2) != Knobs()
    assert Knobs(passthrough={"x": 1}) != Knobs()
    assert Knobs(passthrough={"x": 1}) == Knobs(passthrough={"x": 1})
    assert Knobs() != Knobs().flat()


def test_repr_shows_only_changed_knobs():
    assert repr(Knobs(steps=5)) == "Knobs(engine='deepspeed', {'run.steps': 5})"


# ------------------------------------------------------------------ to_dict / from_dict

def test_to_dict_is_nested_and_json_safe():
    d = Knobs({"aio.block_size": 8192}).to_dict()
    assert d["engine"] == "deepspeed"
    assert d["aio"]["block_size"] == 8192
    assert d["zero_optimization"]["offload_param"]["buffer_size"] == "auto"
    assert d["run"]["steps"] == 3
    assert "passthrough" not in d
    assert json.loads(json.dumps(d, allow_nan=False)) == d


def test_to_dict_from_dict_round_trip_through_json():
    k = Knobs({"run.dtype": "bf16", P + "buffer_count": 7, "run.swap_dir": "/scratch"},
              passthrough={"gradient_clipping": 1.0, "wall_clock_breakdown": True})
    d = json.loads(json.dumps(k.to_dict()))
    assert d["passthrough"] == {"gradient_clipping": 1.0, "wall_clock_breakdown": True}
    back = Knobs.from_dict(d)
    assert back == k
    assert back.flat() == k.flat()
    assert back.passthrough == k.passthrough


def test_from_dict_validates():
    d = Knobs().to_dict()
    d["aio"]["queue_depth"] = 0
    with pytest.raises(KnobError) as info:
        Knobs.from_dict(d)
    assert str(info.value) == "aio.queue_depth=0: must be at least 1"


# ------------------------------------------------------------------ resolve: auto

@pytest.mark.parametrize("model, largest", [(TINY, TINY_LARGEST), (SMALL, SMALL_LARGEST)])
def test_auto_values_are_the_largest_partition(model, largest):
    assert largest == max(t.numel for t in model.tensors()) == model.largest_tensor.numel
    knobs = Knobs()
    r = knobs.resolve(model)
    assert isinstance(r, ResolvedKnobs)
    assert r.largest_partition == largest
    assert r.num_params == model.num_params
    for name in (P + "buffer_size", Z + "sub_group_size", Z + "reduce_bucket_size"):
        assert r[name] == largest
        assert knobs[name] == AUTO  # the Knobs themselves are unchanged
    resolved_autos = ("memascend.staging_elements", "run.dtype", "run.attn_implementation")
    others = {n: v for n, v in r.values.items() if v != largest and n not in resolved_autos}
    assert others == {n: v for n, v in knobs.flat().items() if v != AUTO}
    assert r["run.dtype"] == "fp32"  # the config names no torch_dtype
    assert r["run.attn_implementation"] == "sdpa"  # transformers' default for llama
    assert r["memascend.staging_elements"] == r.staging_plan["bound"]


def test_auto_value_for_a_model_whose_largest_tensor_is_not_the_embedding():
    model = ModelSpec.resolve(WIDE_MLP_LLAMA)
    r = Knobs().resolve(model)
    assert r[P + "buffer_size"] == 4096 * 64
    assert r[Z + "sub_group_size"] == 4096 * 64


def test_explicit_values_are_not_replaced():
    r = Knobs({P + "buffer_size": 5e6, Z + "sub_group_size": 1e8, Z + "reduce_bucket_size": 1e6}).resolve(TINY)
    assert (r[P + "buffer_size"], r[Z + "sub_group_size"], r[Z + "reduce_bucket_size"]) == (5_000_000, 100_000_000,
                                                                                            1_000_000)


def test_resolved_to_dict_is_nested_and_has_no_auto():
    d = Knobs().resolve(TINY).to_dict()
    assert d["engine"] == "deepspeed"
    assert d["zero_optimization"]["offload_param"]["buffer_size"] == TINY_LARGEST
    assert d["zero_optimization"]["sub_group_size"] == TINY_LARGEST
    assert AUTO not in json.dumps(d)


# ------------------------------------------------------------------ real_param_swapping

@pytest.mark.parametrize("values, swapping", [
    ({}, True),  # memlab's default max_in_cpu 0
    ({P + "max_in_cpu": 5_776_640 - 1}, True),  # one element short of the model
    ({P + "max_in_cpu": 5_776_640}, False),  # the whole model fits the CPU flat buffer
    ({P + "max_in_cpu": int(1e9)}, False),  # DeepSpeed's default: a small model never swaps parameters
    ({P + "device": "cpu"}, False),
])
def test_real_param_swapping(values, swapping):
    assert TINY.num_params == 5_776_640
    assert Knobs(values).resolve(TINY).real_param_swapping is swapping


# ------------------------------------------------------------------ traps (CHECKS)

def test_buffer_size_smaller_than_largest_partition_is_rejected():
    err = knob_error({P + "buffer_size": 1e6})
    assert err.knob == P + "buffer_size"
    assert str(err) == (f"{P}buffer_size=1000000: smaller than the largest parameter partition (2097152 elements of "
                        "model.embed_tokens.weight); DeepSpeed fails at init")


def test_buffer_size_trap_with_deepspeeds_measured_case():
    # DeepSpeed's own assert for this case: "More elements 16384000 than buffer size 10000000"
    err = knob_error({P + "buffer_size": 1e7}, SMALL)
    assert "(16384000 elements of model.embed_tokens.weight)" in str(err)


def test_buffer_size_trap_names_the_largest_tensor():
    err = knob_error({P + "buffer_size": 1000}, ModelSpec.resolve(WIDE_MLP_LLAMA))
    assert "(262144 elements of model.layers.0.mlp.gate_proj.weight)" in str(err)


@pytest.mark.parametrize("values", [
    {P + "buffer_size": TINY_LARGEST},  # exactly the largest partition fits
    {P + "buffer_size": TINY_LARGEST + 1},
    {P + "buffer_size": 1000, P + "device": "cpu"},  # no parameter swap buffers at all
])
def test_buffer_size_accepted(values):
    Knobs(values).resolve(TINY)


def risks(values, model=TINY):
    return {risk.knob: risk for risk in Knobs(values).resolve(model).risks}


def test_reuse_distance_with_fewer_buffers_than_swapped_tensors_is_a_risk_not_a_refusal():
    # plain DeepSpeed runs small-llama (30 swapped tensors) with 5 buffers and reuse distance 1e3 or 1e7
    # (tests/engine/test_traps.py): whether it fails depends on how many are kept at once
    (risk,) = risks({Z + "stage3_max_reuse_distance": 1e9}, SMALL).values()
    assert risk.knob == Z + "stage3_max_reuse_distance" and risk.crash == "Not enough"
    assert "5 buffers cannot hold all 30 swapped tensors" in str(risk)
    assert not risks({Z + "stage3_max_reuse_distance": 1e9, P + "buffer_count": 32}, SMALL)
    assert not risks({Z + "stage3_max_reuse_distance": 1e9})  # tiny-llama swaps 2 tensors


def test_live_parameters_while_parameters_swap_with_prefetching_is_a_risk_not_a_refusal():
    # plain DeepSpeed: tiny-llama fails at step 2 ("already assigned swap buffer"), small-llama runs
    (risk,) = risks({Z + "stage3_max_live_parameters": 1}).values()
    assert str(risk).startswith(f"{Z}stage3_max_live_parameters=1: above 0 while parameters swap through NVMe")
    assert risk.crash == "already assigned swap buffer"
    assert not risks({Z + "stage3_max_live_parameters": 1e9, Z + "stage3_prefetch_bucket_size": 0})
    assert not risks({Z + "stage3_max_live_parameters": 1e9, P + "device": "cpu"})


@pytest.mark.parametrize("values", [
    {P + "device": "cpu"},
    {P + "max_in_cpu": 5_776_640},
    {P + "max_in_cpu": int(1e9)},
])
def test_reuse_distance_accepted_without_real_param_swapping(values):
    r = Knobs({Z + "stage3_max_reuse_distance": 1e9, **values}).resolve(TINY)
    assert r[Z + "stage3_max_reuse_distance"] == int(1e9)
    assert r.real_param_swapping is False


@pytest.mark.parametrize("flag, count", [("pipeline_read", 4), ("pipeline_write", 4), ("pipeline_read", 11),
                                         ("pipeline_write", 8)])
def test_pipelined_optimizer_with_fewer_than_twelve_buffers_is_a_risk(flag, count):
    # plain DeepSpeed ran tiny-llama with both pipelines and 8 buffers
    (risk,) = risks({O + flag: True, O + "buffer_count": count}).values()
    assert str(risk).startswith(f"{O}buffer_count={count}: pipelined optimizer swapping keeps up to three")


def test_pipelined_optimizer_accepted():
    r = Knobs({O + "pipeline_read": True, O + "pipeline_write": True, O + "buffer_count": 12}).resolve(TINY)
    assert r[O + "buffer_count"] == 12 and not r.risks
    # optimizer state in CPU RAM: no swap buffers, nothing to check
    assert not risks({O + "pipeline_read": True, O + "buffer_count": 4, O + "device": "cpu"})


@pytest.mark.parametrize("count", [1, 2, 3])
def test_optimizer_needs_four_buffers(count):
    err = knob_error({O + "buffer_count": count})
    assert str(err) == (f"{O}buffer_count={count}: Adam needs at least 4 optimizer swap buffers "
                        "(3 states + the gradient)")


def test_optimizer_buffer_count_accepted():
    Knobs({O + "buffer_count": 4}).resolve(TINY)
    Knobs({O + "buffer_count": 1, O + "device": "cpu"}).resolve(TINY)


def test_init_gather_group():
    def group(model):
        return K.init_gather_group(K.swapped_tensors(Knobs().resolve(model)))
    assert group(SMALL) == 4  # gate/up/down_proj of one MLP (or q/k/v/o) are initialized together
    assert group(TINY) == 1  # only the embedding and lm_head swap


def test_param_buffer_count_too_small_for_init():
    err = knob_error({P + "buffer_count": 3}, SMALL)
    assert str(err) == (f"{P}buffer_count=3: at least 4 buffers are needed: transformers initializes a module's "
                        f"swapped parameters together (with its direct children's), else init fails with "
                        f"'Not enough buffers'")
    Knobs({P + "buffer_count": 1}).resolve(TINY)  # measured: tiny-llama runs with one buffer


@pytest.mark.parametrize("values", [
    {P + "buffer_count": 1},
    {P + "buffer_count": 1, P + "max_in_cpu": int(1e9)},  # nothing swaps
    {P + "buffer_count": 1, P + "device": "cpu"},
])
def test_param_buffer_count_accepted(values):
    Knobs(values).resolve(ModelSpec.resolve(QWEN2_BIASES))


def test_fp16_without_cuda_is_rejected_on_a_cpu_without_fp16_kernels(no_cuda, monkeypatch):
    monkeypatch.setattr(K, "_cpu_fp16_supported", lambda: False)
    err = knob_error({"run.dtype": "fp16"})
    assert str(err) == ("run.dtype='fp16': fp16 training needs a GPU or a CPU with AVX512-FP16 or AMX-FP16 "
                        "(this one has neither); on the CPU accelerator use fp32 or bf16")


def test_fp16_on_a_cpu_with_fp16_kernels_is_accepted(no_cuda, monkeypatch):
    monkeypatch.setattr(K, "_cpu_fp16_supported", lambda: True)
    assert Knobs({"run.dtype": "fp16"}).resolve(ModelSpec.resolve("tiny-llama"))["run.dtype"] == "fp16"


def test_cpu_fp16_support_is_read_from_the_cpu_flags(tmp_path):
    from memlab.ds_rules import cpu_fp16_supported

    with_fp16, without = tmp_path / "with", tmp_path / "without"
    with_fp16.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_fp16 amx_bf16\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16\n")
    assert cpu_fp16_supported(str(with_fp16)) and not cpu_fp16_supported(str(without))
    assert not cpu_fp16_supported(str(tmp_path / "missing"))


def test_fp16_with_cuda_and_bf16_without_are_accepted(monkeypatch):
    monkeypatch.setattr(K, "_cuda_present", lambda: True)
    assert Knobs({"run.dtype": "fp16"}).resolve(TINY)["run.dtype"] == "fp16"
    monkeypatch.setattr(K, "_cuda_present", lambda: False)
    assert Knobs({"run.dtype": "bf16"}).resolve(TINY)["run.dtype"] == "bf16"


def test_gds_without_cuda_is_rejected(no_cuda):
    err = knob_error({"aio.use_gds": True})
    assert str(err) == "aio.use_gds=True: GPUDirect Storage needs a CUDA GPU"


def test_gds_with_cuda_is_accepted(cuda):
    assert Knobs({"aio.use_gds": True}).resolve(TINY)["aio.use_gds"] is True


def test_cuda_detection_reads_the_driver_file(monkeypatch):
    seen = []
    monkeypatch.setattr(K.os.path, "exists", lambda p: seen.append(p) or False)
    assert K._cuda_present() is False
    assert seen == ["/proc/driver/nvidia/version"]


def test_defaults_pass_every_check(no_cuda):
    for model in (TINY, SMALL, ModelSpec.resolve(QWEN2_BIASES), ModelSpec.resolve("qwen-embed")):
        assert not Knobs().resolve(model).risks


def test_refusals_lists_every_failed_check_without_raising():
    from memlab.knobs import ResolvedKnobs

    r = ResolvedKnobs(Knobs({P + "buffer_size": 1000, O + "buffer_count": 2}), TINY, check=False)
    assert [e.knob for e in r.refusals()] == [P + "buffer_size", O + "buffer_count"]


# ------------------------------------------------------------------ to_ds_config

def test_default_ds_config_for_tiny_llama(tmp_path):
    swap = str(tmp_path)
    assert Knobs().resolve(TINY).to_ds_config(tmp_path) == {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
        "zero_optimization": {
            "stage": 3,
            "sub_group_size": TINY_LARGEST,
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 100_000,
            "reduce_bucket_size": TINY_LARGEST,
            "contiguous_gradients": True,
            "offload_param": {"device": "nvme", "buffer_count": 5, "buffer_size": TINY_LARGEST, "max_in_cpu": 0,
                              "pin_memory": True, "nvme_path": swap},
            "offload_optimizer": {"device": "nvme", "buffer_count": 4, "pin_memory": True, "pipeline_read": False,
                                  "pipeline_write": False, "fast_init": False, "ratio": 1.0, "nvme_path": swap},
        },
        "aio": {"block_size": 1048576, "queue_depth": 8, "intra_op_parallelism": 1, "single_submit": False,
                "overlap_events": True, "use_gds": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def test_nvme_path_is_the_given_folder(tmp_path):
    cfg = Knobs().resolve(TINY).to_ds_config(tmp_path / "run1")
    zero = cfg["zero_optimization"]
    assert zero["offload_param"]["nvme_path"] == str(tmp_path / "run1")
    assert zero["offload_optimizer"]["nvme_path"] == str(tmp_path / "run1")
    assert isinstance(zero["offload_param"]["nvme_path"], str)


def test_missing_swap_path_raises_for_nvme():
    with pytest.raises(KnobError) as info:
        Knobs().resolve(TINY).to_ds_config()
    assert str(info.value) == f"{P}nvme_path=None: a swap folder is needed for NVMe offload"
    with pytest.raises(KnobError) as info:
        Knobs({P + "device": "cpu"}).resolve(TINY).to_ds_config(None)
    assert info.value.knob == O + "nvme_path"


def test_no_swap_path_needed_when_nothing_goes_to_nvme():
    cfg = Knobs({P + "device": "cpu", O + "device": "cpu"}).resolve(TINY).to_ds_config()
    assert "nvme_path" not in cfg["zero_optimization"]["offload_param"]
    assert "nvme_path" not in cfg["zero_optimization"]["offload_optimizer"]
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_param_device_cpu_drops_swap_buffer_keys(tmp_path):
    cfg = Knobs({P + "device": "cpu", P + "buffer_count": 9, P + "max_in_cpu": 7}).resolve(TINY).to_ds_config(tmp_path)
    assert cfg["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert cfg["zero_optimization"]["offload_optimizer"]["nvme_path"] == str(tmp_path)


def test_dtype_sections(tmp_path, cuda):
    fp32 = Knobs().resolve(TINY).to_ds_config(tmp_path)
    assert "bf16" not in fp32 and "fp16" not in fp32 and "data_types" not in fp32
    bf16 = Knobs({"run.dtype": "bf16"}).resolve(TINY).to_ds_config(tmp_path)
    assert bf16["bf16"] == {"enabled": True}
    assert "fp16" not in bf16
    fp16 = Knobs({"run.dtype": "fp16"}).resolve(TINY).to_ds_config(tmp_path)
    assert fp16["fp16"] == {"enabled": True, "initial_scale_power": 8}
    assert "bf16" not in fp16
    acc = Knobs({"run.dtype": "bf16", "data_types.grad_accum_dtype": "fp32"}).resolve(TINY).to_ds_config(tmp_path)
    assert acc["data_types"] == {"grad_accum_dtype": "fp32"}


def test_run_shape_reaches_the_ds_config(tmp_path):
    cfg = Knobs({"run.micro_batch": 4, "run.lr": 3e-5}).resolve(TINY).to_ds_config(tmp_path)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["optimizer"] == {"type": "Adam", "params": {"lr": 3e-5}}


def test_passthrough_keys_are_kept(tmp_path):
    k = Knobs.from_ds_config({"gradient_clipping": 1.0, "activation_checkpointing": {"cpu_checkpointing": True},
                              "zero_optimization": {"stage": 3}})
    assert k.passthrough == {"gradient_clipping": 1.0, "activation_checkpointing": {"cpu_checkpointing": True}}
    cfg = k.resolve(TINY).to_ds_config(tmp_path)
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["activation_checkpointing"] == {"cpu_checkpointing": True}


def test_ds_config_is_json_serialisable(tmp_path):
    cfg = Knobs({"run.dtype": "bf16"}).resolve(SMALL).to_ds_config(tmp_path)
    assert json.loads(json.dumps(cfg, allow_nan=False)) == cfg


# ------------------------------------------------------------------ from_ds_config and round trips

ROUND_TRIP_CASES = [
    {},
    {P + "device": "cpu"},
    {O + "device": "cpu", P + "device": "cpu"},
    {"run.dtype": "bf16", "data_types.grad_accum_dtype": "fp32"},
    {O + "pipeline_read": True, O + "pipeline_write": True, O + "buffer_count": 12},
    {P + "device": "cpu", O + "fast_init": True},
    {"aio.block_size": 2 ** 21, "aio.queue_depth": 32, "aio.intra_op_parallelism": 4, "aio.single_submit": True,
     "aio.overlap_events": False},
    {P + "buffer_size": 3e6, P + "buffer_count": 2, Z + "sub_group_size": 1e8, Z + "reduce_bucket_size": 1e6,
     P + "pin_memory": False, O + "pin_memory": False, Z + "contiguous_gradients": False},
    {P + "max_in_cpu": int(1e9), Z + "stage3_max_reuse_distance": int(1e9), "run.micro_batch": 2, "run.lr": 0.01},
]


@pytest.mark.parametrize("values", ROUND_TRIP_CASES)
def test_ds_config_round_trip(values, tmp_path):
    resolved = Knobs(values).resolve(TINY)
    first = resolved.to_ds_config(tmp_path)
    again = Knobs.from_ds_config(first)
    second = again.resolve(TINY).to_ds_config(tmp_path)
    assert second["zero_optimization"] == first["zero_optimization"]
    assert second["aio"] == first["aio"]
    assert second == first
    # every DeepSpeed-side knob comes back (run.* shape outside the ds_config aside)
    ds_side = {n: v for n, v in resolved.values.items()
               if n.startswith(("zero_optimization.", "aio.", "data_types."))}
    back = again.resolve(TINY).values
    for name, value in ds_side.items():
        if name in (P + "buffer_count", P + "buffer_size", P + "max_in_cpu") and resolved[P + "device"] == "cpu":
            continue  # not in the ds_config for cpu-offloaded params
        assert back[name] == value, name


def test_ds_config_round_trip_through_a_file(tmp_path):
    resolved = Knobs({"aio.queue_depth": 16, "run.dtype": "bf16"}).resolve(SMALL)
    first = resolved.to_ds_config(tmp_path / "swap")
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(first))
    for source in (path, str(path)):
        again = Knobs.from_ds_config(source)
        assert again["aio.queue_depth"] == 16 and again["run.dtype"] == "bf16"
        assert again.resolve(SMALL).to_ds_config(tmp_path / "swap") == first


def test_from_ds_config_reads_deepspeed_style_values():
    k = Knobs.from_ds_config({
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 4,
        "optimizer": {"type": "Adam", "params": {"lr": 2e-5}},
        "bf16": {"enabled": True},
        "zero_optimization": {
            "stage": 3,
            "sub_group_size": 1e9,
            "stage3_max_live_parameters": 1e9,
            "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_size": 1e8, "max_in_cpu": 1e9},
            "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 4},
        },
        "aio": {"block_size": 262144, "queue_depth": 32, "single_submit": False},
        "gradient_clipping": 1.0,
    })
    assert k.diff(Knobs()) == {
        "run.micro_batch": (2, 1),
        "run.grad_accum": (4, 1),
        "run.lr": (2e-5, 1e-4),
        "run.dtype": ("bf16", "auto"),
        Z + "sub_group_size": (int(1e9), "auto"),
        Z + "stage3_max_live_parameters": (int(1e9), 0),
        P + "buffer_size": (int(1e8), "auto"),
        P + "max_in_cpu": (int(1e9), 0),
        "aio.block_size": (262144, 1048576),
        "aio.queue_depth": (32, 8),
    }
    assert isinstance(k[P + "buffer_size"], int)
    # train_batch_size is derived, nvme_path is per run; the optimizer section is kept without its lr (run.lr)
    assert k.passthrough == {"gradient_clipping": 1.0, "optimizer": {"type": "Adam", "params": {}}}


def test_from_ds_config_disabled_precision_keeps_fp32():
    assert Knobs.from_ds_config({"bf16": {"enabled": False}, "fp16": {"enabled": False}})["run.dtype"] == "fp32"


def test_from_ds_config_engine_argument(monkeypatch):
    monkeypatch.setattr(K, "MEMASCEND_SWITCHES", {"memascend.pool": ("fixed", "adaptive")})
    assert Knobs.from_ds_config({}, engine="memascend")["memascend.pool"] == "adaptive"
    assert Knobs.from_ds_config({}).engine == "deepspeed"


def test_missing_ds_config_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config(path)
    assert info.value.knob == "ds_config"
    assert str(info.value) == f"ds_config={str(path)!r}: no such file"


def test_ds_config_file_not_json(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text("{ not json")
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config(str(path))
    assert info.value.knob == "ds_config"
    assert info.value.value == str(path)
    assert str(info.value).startswith(f"ds_config={str(path)!r}: not readable JSON (")
    assert "\n" not in str(info.value)


def test_ds_config_file_not_an_object(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text("[1, 2]")
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config(path)
    assert str(info.value) == f"ds_config={str(path)!r}: must hold a JSON object"


def test_ds_config_file_with_zero_stage_2(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config(path)
    assert info.value.knob == f"{path}:zero_optimization.stage"
    assert str(info.value) == f"{path}:zero_optimization.stage=2: memlab runs ZeRO stage 3 only; set it to 3"


def test_ds_config_dict_with_zero_stage_2():
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config({"zero_optimization": {"stage": 2}})
    assert str(info.value) == "ds_config:zero_optimization.stage=2: memlab runs ZeRO stage 3 only; set it to 3"


def test_ds_config_zero_optimization_not_an_object():
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config({"zero_optimization": 3})
    assert str(info.value) == "ds_config:zero_optimization=3: must be an object"


def test_ds_config_unknown_zero_key_suggests():
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config({"zero_optimization": {"stage": 3, "offload_param": {"bufer_size": 1e8}}})
    assert info.value.knob == P + "bufer_size"
    assert str(info.value).endswith(f"unknown knob; did you mean '{P}buffer_size'?")
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config({"zero_optimization": {"stage": 3, "sub_group_sise": 1e8}})
    assert str(info.value) == f"{Z}sub_group_sise=100000000.0: unknown knob; did you mean '{Z}sub_group_size'?"


def test_ds_config_bad_value_is_rejected():
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config({"aio": {"queue_depth": 0}})
    assert str(info.value) == "aio.queue_depth=0: must be at least 1"


# ------------------------------------------------------------------ bugs / unclear behaviour (xfail)

@pytest.mark.parametrize("config", [{"aio": 5}, {"data_types": "fp32"}, {"optimizer": {"params": None}}])
def test_malformed_ds_config_sections_raise_knob_error(config):
    with pytest.raises(KnobError):
        Knobs.from_ds_config(config)


def test_common_deepspeed_zero_keys_are_passed_through(tmp_path):
    k = Knobs.from_ds_config({"zero_optimization": {"stage": 3, "overlap_comm": True,
                                                    "stage3_gather_16bit_weights_on_model_save": True}})
    zero = k.resolve(TINY).to_ds_config(tmp_path)["zero_optimization"]
    assert zero["overlap_comm"] is True
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_optimizer_settings_are_kept_or_refused(tmp_path):
    optimizer = {"type": "AdamW", "params": {"lr": 3e-5, "weight_decay": 0.1, "betas": [0.9, 0.95]}}
    try:
        k = Knobs.from_ds_config({"optimizer": optimizer})
    except KnobError:
        return  # refusing loudly is also acceptable
    assert k.resolve(TINY).to_ds_config(tmp_path)["optimizer"] == optimizer


def test_zero_section_without_stage_is_not_silently_stage_3():
    with pytest.raises(KnobError) as info:
        Knobs.from_ds_config({"zero_optimization": {"offload_param": {"device": "nvme"}}})
    assert info.value.knob.endswith("zero_optimization.stage")


def test_to_dict_does_not_alias_passthrough(tmp_path):
    k = Knobs(passthrough={"gradient_clipping": 1.0, "activation_checkpointing": {"cpu_checkpointing": True}})
    k.to_dict()["passthrough"]["gradient_clipping"] = 5.0
    k.resolve(TINY).to_ds_config(tmp_path)["activation_checkpointing"]["cpu_checkpointing"] = False
    assert k.passthrough == {"gradient_clipping": 1.0, "activation_checkpointing": {"cpu_checkpointing": True}}


# ---------------------------------------------------------------- the configs people have



def test_the_hf_trainer_zero3_nvme_example_is_accepted_and_its_autos_resolved_as_the_trainer_does():
    with pytest.warns(UserWarning, match="aio.thread_count is the old name of aio.intra_op_parallelism"):
        knobs = Knobs.from_ds_config(HF_TRAINER_CONFIG)
    spec = ModelSpec.resolve("small-llama")  # hidden 512
    r = knobs.resolve(spec)
    h = spec.hidden_size
    assert r["zero_optimization.reduce_bucket_size"] == h * h
    assert r["zero_optimization.stage3_prefetch_bucket_size"] == int(0.9 * h * h)
    assert r["zero_optimization.stage3_param_persistence_threshold"] == 10 * h
    assert set(r.from_auto) >= {"zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
                                "zero_optimization.stage3_param_persistence_threshold"}
    assert r["run.dtype"] == "fp32"  # fp16.enabled "auto": the Trainer's default is off
    config = r.to_ds_config("/tmp/swap")
    assert config["optimizer"]["params"] == {"lr": r["run.lr"], "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0}
    assert config["scheduler"]["params"] == {"warmup_min_lr": 0.0, "warmup_max_lr": r["run.lr"], "warmup_num_steps": 1}
    assert config["gradient_clipping"] == 1.0
    assert "thread_count" not in config["aio"] and config["aio"]["block_size"] == 262144
    assert "auto" not in json.dumps(config)  # nothing left for DeepSpeed to refuse


def test_optimizer_only_offload_hands_deepspeed_a_bare_offload_param_section(tmp_path):
    r = Knobs({P + "device": "none"}).resolve(SMALL)
    config = r.to_ds_config(tmp_path)
    assert config["zero_optimization"]["offload_param"] == {"device": "none"}
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "nvme"
    assert not r.real_param_swapping


def test_the_training_dtype_follows_the_models_torch_dtype_unless_set():
    config = {**SMALL.config}
    for torch_dtype, accelerator, want in (("bfloat16", "cpu", "bf16"), ("float32", "cpu", "fp32"),
                                           ("float16", "cuda", "fp16"), ("float16", "cpu", "bf16")):
        spec = ModelSpec.resolve({**config, "torch_dtype": torch_dtype})
        r = Knobs().resolve(spec, accelerator=accelerator)
        assert r["run.dtype"] == want
        assert torch_dtype in r.from_auto["run.dtype"]
    cpu_fp16 = Knobs().resolve(ModelSpec.resolve({**config, "torch_dtype": "float16"}), accelerator="cpu")
    assert "CPU accelerator" in cpu_fp16.from_auto["run.dtype"]
    spec = ModelSpec.resolve({**config, "torch_dtype": "bfloat16"})
    explicit = Knobs({"run.dtype": "fp32"}).resolve(spec)
    assert explicit["run.dtype"] == "fp32" and "run.dtype" not in explicit.from_auto
    # a ds_config decides as DeepSpeed does: fp32 unless bf16 or fp16 is enabled
    assert Knobs.from_ds_config({"zero_optimization": {"stage": 3}}).resolve(spec)["run.dtype"] == "fp32"
    assert Knobs.from_ds_config({"bf16": {"enabled": True}}).resolve(SMALL)["run.dtype"] == "bf16"
    with pytest.raises(KnobError, match=r"run.dtype='auto': the model's torch_dtype 'float8_e4m3fn'"):
        Knobs().resolve(ModelSpec.resolve({**config, "torch_dtype": "float8_e4m3fn"}))


def test_an_auto_the_trainer_does_not_fill_is_refused_with_the_reason():
    with pytest.raises(KnobError, match="the HF Trainer fills only"):
        Knobs.from_ds_config({"zero_optimization": {"stage": 3, "stage3_max_live_parameters": "auto"}})


def test_an_aio_section_inside_zero_optimization_is_refused_as_deepspeed_does():
    with pytest.raises(KnobError, match="DeepSpeed reads aio at the top level"):
        Knobs.from_ds_config({"zero_optimization": {"stage": 3, "aio": {"block_size": 262144}}})


def test_set_takes_deepspeeds_own_top_level_names(capsys):
    # as a --knobs ds_config does: the micro batch becomes run.micro_batch, accumulation run.grad_accum
    from memlab.cli import main

    assert main(["estimate", "--set", "train_micro_batch_size_per_gpu=3", "--set", "gradient_accumulation_steps=4",
                 "--set", "gradient_clipping=0.5", "--json"]) == 0
    knobs = json.loads(capsys.readouterr().out)["knobs"]
    assert knobs["run.micro_batch"] == 3 and knobs["run.grad_accum"] == 4


def test_checkpoint_knobs_are_checked_before_the_run(tmp_path):
    with pytest.raises(KnobError, match="after the last step: run.steps is 3"):
        Knobs({"run.save_checkpoint_at": 4}).resolve(ModelSpec.resolve("tiny-llama"))
    with pytest.raises(KnobError) as err:
        Knobs({"run.resume_from": str(tmp_path)}).resolve(ModelSpec.resolve("tiny-llama"))
    assert err.value.knob == "run.resume_from" and "no 'latest' file" in str(err.value)
    (tmp_path / "latest").write_text("global_step2")
    assert Knobs({"run.resume_from": str(tmp_path)}).resolve(ModelSpec.resolve("tiny-llama"))["run.resume_from"]


def test_resuming_swapped_parameters_with_the_optimizer_on_the_cpu_is_a_risk(tmp_path):
    (tmp_path / "latest").write_text("global_step2")
    resolved = Knobs({"run.resume_from": str(tmp_path), O + "device": "cpu"}).resolve(ModelSpec.resolve("tiny-llama"))
    assert [r.knob for r in resolved.risks] == ["run.resume_from"]

"""ModelSpec: shapes are the real transformers models'; loading and errors.
Every other family, and the activations: tests/unit/test_shapes.py."""

import json
import subprocess
import sys

import pytest
from helpers import ROOT as REPO

from memlab.models import DEFAULT_PRESET, ModelSpec, ModelSpecError, TensorSpec

# Published parameter counts of the real checkpoints.
EXPECTED_PARAMS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_248_023_552,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen2.5-14b": 14_770_033_664,
    "qwen2.5-32b": 32_763_876_352,
    "qwen2.5-72b": 72_706_203_648,
}

TINY_QWEN2_TIED_GQA = {
    "model_type": "qwen2", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
TINY_MISTRAL = {
    "model_type": "mistral", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
}
# Biases on every linear and an explicit head_dim that is not hidden/heads.
TINY_LLAMA_BIASES = {
    "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 32, "attention_bias": True, "mlp_bias": True,
}
# num_key_value_heads absent: transformers' per-architecture defaults apply (qwen2 32, mistral 8).
TINY_QWEN2_KV_DEFAULT = {
    "model_type": "qwen2", "vocab_size": 100, "hidden_size": 256, "intermediate_size": 96,
    "num_hidden_layers": 1, "num_attention_heads": 64,
}
TINY_MISTRAL_KV_DEFAULT = {
    "model_type": "mistral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 1, "num_attention_heads": 16,
}
TINY_QWEN2_HEAD_DIM = dict(TINY_QWEN2_TIED_GQA, head_dim=16, tie_word_embeddings=False)

MINIMAL_LLAMA = {
    "model_type": "llama", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 1, "num_attention_heads": 4,
}


def real_named_shapes(spec):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(spec.hf_config())
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def spec_shapes(spec):
    return [(t.name, t.shape) for t in spec.tensors()]


# ---------------------------------------------------------------- shapes vs transformers


@pytest.mark.parametrize("preset", ["tiny-llama", "small-llama", "qwen-embed"])
def test_small_presets_match_named_parameters(preset):
    spec = ModelSpec.resolve(preset)
    assert real_named_shapes(spec) == spec_shapes(spec)


@pytest.mark.parametrize(
    "config",
    [TINY_QWEN2_TIED_GQA, TINY_MISTRAL, TINY_LLAMA_BIASES, TINY_QWEN2_KV_DEFAULT,
     TINY_MISTRAL_KV_DEFAULT, TINY_QWEN2_HEAD_DIM],
    ids=["qwen2-tied-gqa", "mistral", "llama-biases-head-dim", "qwen2-kv-default",
         "mistral-kv-default", "qwen2-head-dim"],
)
def test_tiny_configs_match_named_parameters(config):
    spec = ModelSpec.resolve(config)
    assert real_named_shapes(spec) == spec_shapes(spec)


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS))
def test_real_presets_match_named_parameters(preset):
    # Meta device: shapes only, no memory, so even 72B builds in seconds.
    spec = ModelSpec.resolve(preset)
    assert real_named_shapes(spec) == spec_shapes(spec)


def test_tied_embeddings_listed_once():
    spec = ModelSpec.resolve(TINY_QWEN2_TIED_GQA)
    names = [t.name for t in spec.tensors()]
    assert spec.tied_embeddings and "lm_head.weight" not in names
    assert spec.tensors()[2] == TensorSpec("model.layers.0.self_attn.q_proj.bias", (64,), 64, "float32")
    structure = spec.structure
    assert structure["input_embedding"] == structure["output_embedding"] == "model.embed_tokens.weight"
    assert structure["layers"] == "model.layers" and structure["num_layers"] == 2


def test_kv_head_defaults_follow_transformers():
    # absent num_key_value_heads: each architecture's own default (qwen2 32, mistral 8, llama = heads)
    for config, kv in ((TINY_QWEN2_KV_DEFAULT, 32), (TINY_MISTRAL_KV_DEFAULT, 8), (MINIMAL_LLAMA, 4)):
        k_proj = next(t for t in ModelSpec.resolve(config).tensors() if t.name.endswith("k_proj.weight"))
        head_dim = config["hidden_size"] // config["num_attention_heads"]
        assert k_proj.shape == (kv * head_dim, config["hidden_size"])


# ---------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS))
def test_real_preset_param_counts(preset):
    assert ModelSpec.resolve(preset).num_params == EXPECTED_PARAMS[preset]


def test_small_preset_shapes():
    tiny = ModelSpec.resolve(DEFAULT_PRESET)
    assert DEFAULT_PRESET == "tiny-llama"
    assert (tiny.model_type, tiny.vocab_size, tiny.hidden_size) == ("llama", 8192, 256)
    assert (tiny.num_layers, tiny.tied_embeddings) == (2, False)
    assert tiny.config["max_position_embeddings"] == 512
    assert tiny.num_params == 5_776_640
    assert ModelSpec.resolve("small-llama").num_params == 45_421_056

    embed = ModelSpec.resolve("qwen-embed")
    assert (embed.model_type, embed.vocab_size, embed.tied_embeddings) == ("qwen2", 151936, True)
    assert embed.largest_tensor == TensorSpec("model.embed_tokens.weight", (151936, 896), 151936 * 896, "float32")
    assert embed.num_params == 165_960_320


def test_presets_listing_and_descriptions():
    names = ModelSpec.presets()
    assert names == sorted(names)
    assert set(EXPECTED_PARAMS) | {"tiny-llama", "small-llama", "qwen-embed"} == set(names)
    for name in names:
        spec = ModelSpec.resolve(name)
        assert spec.source == "preset" and spec.name == name
        assert spec.description and "\n" not in spec.description
        assert "_memlab_description" not in spec.config


@pytest.mark.parametrize("preset", sorted(EXPECTED_PARAMS) + ["tiny-llama", "qwen-embed"])
def test_presets_accepted_by_transformers(preset):
    pytest.importorskip("transformers")
    spec = ModelSpec.resolve(preset)
    cfg = spec.hf_config()
    assert cfg.model_type == spec.model_type
    assert bool(cfg.tie_word_embeddings) == spec.tied_embeddings


def test_properties():
    spec = ModelSpec.resolve("llama-3.1-8b")
    assert spec.torch_dtype == "bfloat16"
    assert spec.largest_tensor.name == "model.embed_tokens.weight"  # first of the two equal tensors
    assert ModelSpec.resolve(MINIMAL_LLAMA).torch_dtype == "float32"
    assert ModelSpec.resolve(dict(MINIMAL_LLAMA, dtype="float16")).torch_dtype == "float16"


# ---------------------------------------------------------------- resolve


def test_resolve_returns_spec_as_is():
    spec = ModelSpec.resolve("tiny-llama")
    assert ModelSpec.resolve(spec) is spec


def test_resolve_config_json_path(tmp_path):
    path = tmp_path / "my-model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(TINY_MISTRAL))
    for x in (str(path), path):
        spec = ModelSpec.resolve(x)
        assert spec.name == "my-model" and spec.source == str(path)
        assert spec.config == TINY_MISTRAL and spec.checkpoint_dir is None


def test_resolve_other_json_file_named_by_stem(tmp_path):
    path = tmp_path / "shape.json"
    path.write_text(json.dumps(TINY_MISTRAL))
    assert ModelSpec.resolve(str(path)).name == "shape"


def test_resolve_checkpoint_directory(tmp_path):
    ckpt = tmp_path / "ckpt-42"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(TINY_QWEN2_TIED_GQA))
    (ckpt / "model.safetensors").write_bytes(b"not read by ModelSpec")
    spec = ModelSpec.resolve(str(ckpt))
    assert spec.name == "ckpt-42" and spec.source == str(ckpt) and spec.checkpoint_dir == str(ckpt)
    assert spec.config == TINY_QWEN2_TIED_GQA


def test_resolve_dict_copies_config():
    config = dict(TINY_MISTRAL, _memlab_description="a note")
    spec = ModelSpec.resolve(config)
    assert spec.source == "dict" and spec.config == TINY_MISTRAL and spec.description == ""
    config["hidden_size"] = 1
    assert spec.hidden_size == 64


def test_to_dict_from_dict_round_trip():
    for x in ("tiny-llama", "qwen2.5-0.5b", TINY_LLAMA_BIASES):
        spec = ModelSpec.resolve(x)
        d = json.loads(json.dumps(spec.to_dict()))
        assert set(d) == {"name", "source", "config"}
        back = ModelSpec.from_dict(d)
        assert back == spec and back.description == spec.description
        assert ModelSpec.resolve(d) == spec
    assert ModelSpec.resolve("tiny-llama") != ModelSpec.resolve("small-llama")


# ---------------------------------------------------------------- errors


def error_message(x, resolver=ModelSpec.resolve):
    with pytest.raises(ModelSpecError) as info:
        resolver(x)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_is_a_value_error():
    assert issubclass(ModelSpecError, ValueError)


def test_unknown_preset_names_closest_and_available():
    message = error_message("tiny-lama")
    assert "'tiny-lama'" in message and "closest: 'tiny-llama'" in message
    for name in ModelSpec.presets():
        assert name in message
    assert "closest" not in error_message("zzzzzz")


def test_missing_path(tmp_path):
    missing = str(tmp_path / "nope" / "config.json")
    message = error_message(missing)
    assert missing in message and "does not exist" in message


def test_checkpoint_directory_without_config(tmp_path):
    message = error_message(str(tmp_path))
    assert str(tmp_path) in message and "config.json" in message


def test_unreadable_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama",')
    message = error_message(str(path))
    assert str(path) in message and "not valid JSON" in message and "line 1" in message


def test_json_not_an_object(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("[1, 2]")
    message = error_message(str(path))
    assert str(path) in message and "JSON object" in message


def test_missing_model_type_names_file_and_field(tmp_path):
    # every other field has transformers' default for the architecture
    config = {k: v for k, v in MINIMAL_LLAMA.items() if k != "model_type"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    message = error_message(str(path))
    assert str(path) in message and "'model_type'" in message and "missing" in message
    # Through a checkpoint directory the message names its config.json, too.
    assert str(path) in error_message(str(tmp_path))


@pytest.mark.parametrize(
    "field, value",
    [("hidden_size", 0), ("vocab_size", -5), ("num_hidden_layers", 2.5), ("intermediate_size", "64"),
     ("num_attention_heads", True), ("num_key_value_heads", 0), ("head_dim", 8.0)],
)
def test_bad_sizes_name_field_and_value(field, value):
    message = error_message(dict(MINIMAL_LLAMA, **{field: value}))
    assert repr(field) in message and repr(value) in message and "positive integer" in message


def built(x):
    return ModelSpec.resolve(x).tensors()


def test_model_type_transformers_does_not_know_names_the_closest(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(MINIMAL_LLAMA, model_type="lama")))
    message = error_message(str(path), built)
    assert str(path) in message and "'lama'" in message and "closest: llama" in message


def test_a_config_transformers_cannot_run_is_refused_with_its_reason():
    # 4 query heads cannot share 3 key/value heads: the model's own forward fails, and says so
    message = error_message(dict(MINIMAL_LLAMA, num_key_value_heads=3), built)
    assert message.startswith("config dict 'llama': its forward does not run")


def test_bad_boolean_field():
    message = error_message(dict(MINIMAL_LLAMA, tie_word_embeddings="yes"))
    assert "'tie_word_embeddings'" in message and "'yes'" in message


def test_not_json_serialisable_config():
    message = error_message(dict(MINIMAL_LLAMA, extra=object()))
    assert "JSON" in message


def test_bad_resolve_argument():
    assert "42" in error_message(42)


def test_from_dict_missing_field():
    message = error_message({"name": "x", "config": MINIMAL_LLAMA}, ModelSpec.from_dict)
    assert "'source'" in message


# ---------------------------------------------------------------- import cost


def test_import_does_not_load_heavy_libraries():
    code = (
        "import memlab.models, sys; "
        "assert 'torch' not in sys.modules; "
        "assert 'transformers' not in sys.modules; "
        "assert 'deepspeed' not in sys.modules; "
        "memlab.models.ModelSpec.resolve('qwen2.5-7b').tensors(); "
        "assert 'torch' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

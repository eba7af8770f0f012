"""Any causal LM transformers can build: parameters read off the model
transformers builds, activations derived from its forward on fake tensors,
both checked here against torch itself (a meta-device build, a real forward
on the CPU), and sized end to end for every family below at its published
size."""
import json

import pytest
import torch
import transformers
from helpers import TINY_FAMILIES

from memlab import KnobError, Knobs, ModelSpec, ModelSpecError, shapes
from memlab.sizing import Hardware, estimate, fit

GiB = 1 << 30

# model_types at their config classes' defaults (each the size of a model it was published with), dense
# and mixture-of-experts (the last five)
PUBLISHED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
             "falcon", "olmo", "olmo2", "stablelm", "cohere", "granite",
             "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss")


def meta_model(config):
    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("model_type", PUBLISHED)
def test_parameters_are_the_meta_models(model_type):
    config = {"model_type": model_type}
    spec = ModelSpec.resolve(config)
    model = meta_model(config)
    # named_parameters lists a tied weight once: so do memlab's tensors
    assert [(t.name, t.shape) for t in spec.tensors()] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert spec.tied_embeddings == (model.get_output_embeddings().weight is model.get_input_embeddings().weight)


@pytest.mark.parametrize("model_type", PUBLISHED)
def test_every_family_is_estimated_and_fitted(model_type):
    config = {"model_type": model_type}
    est = estimate(config, {"run.dtype": "bf16", "run.seq_len": 2048})
    assert est.num_params == ModelSpec.resolve(config).num_params
    assert est.peak_host_bytes > est.num_params  # at least a byte a parameter somewhere
    assert est.phases["forward"]["activations"] > 0
    node = Hardware(ram_bytes=4096 * GiB)
    report = fit(config, target="seq_len", hardware=node, knobs={"run.dtype": "bf16"})
    for engine, result in report.results.items():
        # the longest sequence whose estimate fits the RAM, one token more does not
        assert result.value is not None and result.limit == "ram", (engine, result)
        for seq_len, fits in ((result.value, True), (result.value + 1, False)):
            peak = estimate(config, {"run.dtype": "bf16", "run.seq_len": seq_len}, node, engine=engine)
            assert (peak.node_peak_host_bytes <= node.ram_bytes) == fits, (engine, seq_len)


def saved_in_a_real_forward(config, dtype, batch, seq, attn_implementation=None):
    """What autograd saves in a real forward on the CPU, by segment as memlab splits it: bytes of the
    distinct storages saved before the first decoder layer, in the layers, and after the last."""
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(**config)
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype), **options).train()
    layers = next(m for n, m in model.named_modules() if n == ModelSpec.resolve(config).structure["layers"])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    where, seen, kept, out = ["before"], set(), [], {"before": 0, "layers": 0, "after": 0}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            kept.append(storage)
            if where[0] in out:
                out[where[0]] += storage.nbytes()
        return tensor

    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: where.__setitem__(0, "layers"))
        layer.register_forward_hook(lambda *_: where.__setitem__(0, "after"))
    model.get_output_embeddings().register_forward_pre_hook(lambda *_: where.__setitem__(0, "head"))
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return out


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
@pytest.mark.parametrize("dtype, batch, seq, attention", [("float32", 1, 45, None), ("bfloat16", 3, 29, None),
                                                          ("float32", 2, 33, "eager")])
def test_derived_activations_are_what_a_real_forward_saves(family, dtype, batch, seq, attention):
    # shapes the derivation does not use (it solves at prime lengths 37-71 and checks at 61); eager
    # attention saves its probabilities (quadratic in the length), sdpa (the default here) does not
    config = TINY_FAMILIES[family]
    run_dtype = {"float32": "fp32", "bfloat16": "bf16"}[dtype]
    saved = ModelSpec.resolve(config).saved_activations(run_dtype, False, attention)
    derived = {"before": sum(saved.before(batch, seq)), "after": sum(saved.after(batch, seq)),
               "layers": sum(map(sum, saved.layers(batch, seq)))}
    assert derived == saved_in_a_real_forward(config, dtype, batch, seq, attention)


def test_eager_attention_saves_more_where_the_default_is_sdpa():
    spec = ModelSpec.resolve(TINY_FAMILIES["qwen3"])
    assert spec.attn_implementation == "sdpa"
    default, eager = (sum(map(sum, spec.saved_activations("fp32", False, a).layers(1, 512))) for a in (None, "eager"))
    assert eager > default
    est = {a: estimate(TINY_FAMILIES["qwen3"], {"run.attn_implementation": a, "run.seq_len": 512}) for a in ("auto", "eager")}
    assert est["auto"].knobs["run.attn_implementation"] == "sdpa"
    assert est["eager"].phases["forward"]["activations"] > est["auto"].phases["forward"]["activations"]


def test_moe_experts_are_partitioned_like_any_parameter():
    # transformers 5 keeps a layer's experts in 3-D tensors: each one parameter ZeRO-3 partitions and swaps
    spec = ModelSpec.resolve(TINY_FAMILIES["mixtral"])
    experts = [t for t in spec.tensors() if ".experts." in t.name]
    assert experts and all(len(t.shape) == 3 and t.shape[0] == 4 for t in experts)


def test_a_second_question_is_answered_without_the_helper(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMLAB_CACHE_DIR", str(tmp_path))
    config = dict(TINY_FAMILIES["gpt2"], n_layer=3)
    asked = []
    derive = shapes._derive
    monkeypatch.setattr(shapes, "_derive", lambda items: asked.append(len(items)) or derive(items))
    estimate(config)
    assert asked == [2]  # the structure and what is saved: one request
    estimate(config)
    monkeypatch.setattr(shapes, "_memory", {})  # a new process: the disk cache answers
    estimate(config)
    assert asked == [2]
    assert len(list((tmp_path / "shapes").iterdir())) == 2


def test_unknown_model_type_and_broken_configs_are_one_line():
    with pytest.raises(ModelSpecError, match=r"model_type 'qwen9' is not one transformers .* knows \(closest: qwen"):
        ModelSpec.resolve({"model_type": "qwen9", "hidden_size": 64}).tensors()
    broken = dict(TINY_FAMILIES["qwen3"], num_key_value_heads=3)  # 4 heads cannot share 3 key/value heads
    with pytest.raises(ModelSpecError) as info:
        ModelSpec.resolve(broken).tensors()
    assert "\n" not in str(info.value) and "config dict" in str(info.value)


def test_a_hub_id_says_how_to_get_its_config():
    with pytest.raises(ModelSpecError, match="huggingface-cli download Qwen/Qwen3-8B config.json"):
        ModelSpec.resolve("Qwen/Qwen3-8B")


def test_estimate_json_reports_the_parameter_count(tmp_path, capsys):
    from memlab.cli import main

    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_FAMILIES["qwen3_moe"]))
    assert main(["estimate", "--model", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_params"] == sum(
        p.numel() for p in meta_model(TINY_FAMILIES["qwen3_moe"]).parameters())


def test_sdpa_is_refused_for_a_class_transformers_builds_only_with_eager():
    # transformers itself refuses it: "BloomForCausalLM does not support an attention implementation
    # through torch.nn.functional.scaled_dot_product_attention yet"
    bloom = ModelSpec.resolve({"model_type": "bloom", "n_layer": 2, "hidden_size": 64, "n_head": 4})
    assert bloom.attn_implementation == "eager"
    with pytest.raises(KnobError, match=r"run.attn_implementation='sdpa': transformers has no sdpa attention "
                                        r"for model_type 'bloom'"):
        Knobs({"run.attn_implementation": "sdpa"}).resolve(bloom)
    assert Knobs().resolve(bloom)["run.attn_implementation"] == "eager"

"""ModelSpec: which model a run fine-tunes, and its tensor shapes.

A ModelSpec is an HF config.json dict plus a name and where it came from
(a preset, a config.json file, a local checkpoint directory, or a dict).
The sizing model needs every parameter tensor's shape; `tensors()` derives
them from the config alone, in the order and with the names of
`model.named_parameters()`, so predictions line up with what the engine
partitions. Only stdlib here: importing memlab must not import torch,
transformers or deepspeed (DESIGN.md); `hf_config()` imports transformers
when a run actually needs it.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from importlib import resources
from typing import Any, NamedTuple

DEFAULT_PRESET = "tiny-llama"

# Preset files carry a one-line description under this key; it is not an
# HF config field, so the loader moves it to `spec.description`.
DESCRIPTION_KEY = "_memlab_description"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

REQUIRED_SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
    "num_attention_heads",
)

# What transformers uses when `num_key_value_heads` is absent from the
# config (None means "same as num_attention_heads"). These differ per
# architecture, and the real model's k/v shapes follow them.
_KV_HEADS_DEFAULT = {"llama": None, "mistral": 8, "qwen2": 32}

# transformers' default for `tie_word_embeddings` per architecture.
_TIE_DEFAULT = {"llama": False, "mistral": False, "qwen2": False}


class ModelSpecError(ValueError):
    """A model name, file or config that memlab cannot use (one-line message)."""


class TensorSpec(NamedTuple):
    name: str
    shape: tuple
    numel: int


class ModelSpec:
    """A decoder-only causal LM described by its HF config.json dict."""

    def __init__(self, name: str, config: dict, source: str, description: str = ""):
        where = _where(name, source)
        if not isinstance(config, dict):
            raise ModelSpecError(f"{where}: config must be a dict (a config.json object), got {type(config).__name__}")
        config = _json_copy(config, where)
        config.pop(DESCRIPTION_KEY, None)
        _validate(config, where)
        self.name = str(name)
        self.source = str(source)
        self.config = config
        self.description = description

    # ------------------------------------------------------------ resolving

    @classmethod
    def resolve(cls, x: Any) -> "ModelSpec":
        """A ModelSpec from a spec, preset name, config.json path, checkpoint dir or dict."""
        if isinstance(x, ModelSpec):
            return x
        if isinstance(x, dict):
            return cls._from_any_dict(x)
        if isinstance(x, os.PathLike):
            return cls.from_path(os.fspath(x))
        if not isinstance(x, str):
            raise ModelSpecError(
                f"model: expected a preset name, a path or a config dict, got {type(x).__name__} {x!r}"
            )
        if x in _preset_names():
            return cls.from_preset(x)
        path = os.path.expanduser(x)
        if os.path.exists(path) or _looks_like_path(x):
            return cls.from_path(path)
        raise ModelSpecError(_unknown_preset_message(x))

    @classmethod
    def from_preset(cls, name: str) -> "ModelSpec":
        if name not in _preset_names():
            raise ModelSpecError(_unknown_preset_message(name))
        where = f"preset {name!r}"
        config = _parse_json(_preset_file(name).read_text(encoding="utf-8"), where)
        description = config.pop(DESCRIPTION_KEY, "")
        return cls(name, config, "preset", description=str(description))

    @classmethod
    def from_path(cls, path: str) -> "ModelSpec":
        """From a config.json file or a local HF checkpoint directory (weights are not read)."""
        path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        if not os.path.exists(path):
            raise ModelSpecError(f"{path}: model path does not exist")
        if os.path.isdir(path):
            config_file = os.path.join(path, "config.json")
            if not os.path.isfile(config_file):
                raise ModelSpecError(f"{path}: checkpoint directory has no config.json")
            name = os.path.basename(path.rstrip(os.sep)) or path
        else:
            config_file = path
            # ".../my-model/config.json" is named after its directory.
            stem = os.path.splitext(os.path.basename(path))[0]
            name = os.path.basename(os.path.dirname(path)) if stem == "config" else stem
        config = _read_json_file(config_file)
        description = config.pop(DESCRIPTION_KEY, "")
        # Error messages name the file the fields came from.
        return cls(name or "model", config, path, description=str(description))

    @classmethod
    def _from_any_dict(cls, d: dict) -> "ModelSpec":
        # A to_dict() output resolves like from_dict; anything else is a config.json dict.
        if set(d) == {"name", "source", "config"}:
            return cls.from_dict(d)
        name = d.get("_name_or_path") or d.get("model_type") or "model"
        return cls(str(name), d, "dict")

    # ------------------------------------------------------------ presets

    @staticmethod
    def presets() -> list:
        """Sorted preset names."""
        return sorted(_preset_names())

    # ------------------------------------------------------------ serialisation

    def to_dict(self) -> dict:
        return {"name": self.name, "source": self.source, "config": copy.deepcopy(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        if not isinstance(d, dict):
            raise ModelSpecError(f"model spec: expected a dict with name, source, config, got {type(d).__name__}")
        for key in ("name", "source", "config"):
            if key not in d:
                raise ModelSpecError(f"model spec dict: missing field {key!r} (have {sorted(d)})")
        description = ""
        # Descriptions are not serialised; a preset's comes back from its file.
        if d["source"] == "preset" and d["name"] in _preset_names():
            description = _preset_description(d["name"])
        return cls(d["name"], d["config"], d["source"], description=description)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelSpec):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable config: equal specs need not stay equal

    def __repr__(self) -> str:
        return (
            f"ModelSpec({self.name!r}, {self.model_type}, {self.num_params:,} params, "
            f"source={self.source!r})"
        )

    # ------------------------------------------------------------ shape facts

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def vocab_size(self) -> int:
        return self.config["vocab_size"]

    @property
    def hidden_size(self) -> int:
        return self.config["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.config["num_hidden_layers"]

    @property
    def intermediate_size(self) -> int:
        return self.config["intermediate_size"]

    @property
    def num_heads(self) -> int:
        return self.config["num_attention_heads"]

    @property
    def num_kv_heads(self) -> int:
        return _num_kv_heads(self.config)

    @property
    def head_dim(self) -> int:
        return _head_dim(self.config)

    @property
    def tied_embeddings(self) -> bool:
        return _tied(self.config)

    @property
    def torch_dtype(self) -> str:
        return str(self.config.get("torch_dtype") or self.config.get("dtype") or "float32")

    @property
    def checkpoint_dir(self):
        """The local checkpoint directory this spec was read from, or None."""
        return self.source if os.path.isdir(self.source) else None

    def tensors(self) -> list:
        """Every parameter as TensorSpec, in `model.named_parameters()` order."""
        c = self.config
        h, inter = self.hidden_size, self.intermediate_size
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        qkv_bias, o_bias, mlp_bias = _biases(c)

        out = [_t("model.embed_tokens.weight", self.vocab_size, h)]
        for i in range(self.num_layers):
            attn = f"model.layers.{i}.self_attn"
            mlp = f"model.layers.{i}.mlp"
            out += _linear(f"{attn}.q_proj", h, q_out, qkv_bias)
            out += _linear(f"{attn}.k_proj", h, kv_out, qkv_bias)
            out += _linear(f"{attn}.v_proj", h, kv_out, qkv_bias)
            out += _linear(f"{attn}.o_proj", q_out, h, o_bias)
            out += _linear(f"{mlp}.gate_proj", h, inter, mlp_bias)
            out += _linear(f"{mlp}.up_proj", h, inter, mlp_bias)
            out += _linear(f"{mlp}.down_proj", inter, h, mlp_bias)
            out.append(_t(f"model.layers.{i}.input_layernorm.weight", h))
            out.append(_t(f"model.layers.{i}.post_attention_layernorm.weight", h))
        out.append(_t("model.norm.weight", h))
        # A tied lm_head shares embed_tokens' Parameter; named_parameters lists it once.
        if not self.tied_embeddings:
            out.append(_t("lm_head.weight", self.vocab_size, h))
        return out

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors())

    @property
    def largest_tensor(self) -> TensorSpec:
        # max() keeps the first of equals: embed_tokens before an untied lm_head.
        return max(self.tensors(), key=lambda t: t.numel)

    # ------------------------------------------------------------ transformers

    def hf_config(self):
        """The transformers PretrainedConfig (imports transformers on first use)."""
        import transformers  # lazy: heavy, and only the worker and tests need it

        return transformers.AutoConfig.for_model(**copy.deepcopy(self.config))


# ---------------------------------------------------------------- shapes


def _t(name: str, *shape: int) -> TensorSpec:
    numel = 1
    for n in shape:
        numel *= n
    return TensorSpec(name, tuple(shape), numel)


def _linear(prefix: str, in_features: int, out_features: int, bias: bool) -> list:
    # nn.Linear registers weight (out, in) then bias (out,).
    tensors = [_t(f"{prefix}.weight", out_features, in_features)]
    if bias:
        tensors.append(_t(f"{prefix}.bias", out_features))
    return tensors


def _biases(config: dict) -> tuple:
    """(q/k/v bias, o_proj bias, mlp bias) as the transformers modules build them."""
    model_type = config["model_type"]
    if model_type == "qwen2":
        return True, False, False  # Qwen2Attention hard-codes bias on q/k/v only
    if model_type == "llama":
        attn = bool(config.get("attention_bias") or False)
        return attn, attn, bool(config.get("mlp_bias") or False)
    return False, False, False  # mistral: no biases, no switches


def _num_kv_heads(config: dict) -> int:
    if "num_key_value_heads" in config:
        kv = config["num_key_value_heads"]
    else:
        kv = _KV_HEADS_DEFAULT[config["model_type"]]
    return config["num_attention_heads"] if kv is None else kv


def _head_dim(config: dict) -> int:
    head_dim = config.get("head_dim")
    if head_dim is None:
        return config["hidden_size"] // config["num_attention_heads"]
    return head_dim


def _tied(config: dict) -> bool:
    tied = config.get("tie_word_embeddings")
    return _TIE_DEFAULT[config["model_type"]] if tied is None else tied


# ---------------------------------------------------------------- validation


def _validate(config: dict, where: str) -> None:
    if "model_type" not in config:
        raise ModelSpecError(f"{where}: missing required field 'model_type'")
    model_type = config["model_type"]
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelSpecError(
            f"{where}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    for field in REQUIRED_SIZE_FIELDS:
        if field not in config:
            raise ModelSpecError(f"{where}: missing required field {field!r}")
        _check_size(config, field, where)
    for field in ("num_key_value_heads", "head_dim"):
        if config.get(field) is not None:
            _check_size(config, field, where)
    for field in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        value = config.get(field)
        if value is not None and not isinstance(value, bool):
            raise ModelSpecError(f"{where}: field {field!r} must be true or false, got {value!r}")

    heads = config["num_attention_heads"]
    kv = _num_kv_heads(config)
    if heads % kv != 0:
        # repeat_kv needs a whole number of query heads per key/value head.
        origin = "" if "num_key_value_heads" in config else f" (transformers' {model_type} default when absent)"
        raise ModelSpecError(
            f"{where}: field 'num_key_value_heads' = {kv}{origin} does not divide "
            f"num_attention_heads = {heads}"
        )
    if config.get("head_dim") is None or model_type == "llama":
        # Without head_dim the width is split evenly across heads; LlamaConfig insists always.
        if config["hidden_size"] % heads != 0:
            raise ModelSpecError(
                f"{where}: field 'hidden_size' = {config['hidden_size']} is not a multiple of "
                f"num_attention_heads = {heads}"
            )


def _check_size(config: dict, field: str, where: str) -> None:
    value = config[field]
    # bool is an int subclass; true/false is never a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelSpecError(f"{where}: field {field!r} must be a positive integer, got {value!r}")
    if value <= 0:
        raise ModelSpecError(f"{where}: field {field!r} must be a positive integer, got {value}")


def _where(name: str, source: str) -> str:
    """How error messages name the origin of a config."""
    if source == "preset":
        return f"preset {name!r}"
    if source == "dict":
        return f"config dict {name!r}"
    if os.path.isdir(source):
        return os.path.join(source, "config.json")
    return str(source)


# ---------------------------------------------------------------- files


def _read_json_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ModelSpecError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ModelSpecError(f"{path}: not valid JSON (not UTF-8 text: {e.reason})") from None
    return _parse_json(text, path)


def _parse_json(text: str, where: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ModelSpecError(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def _json_copy(config: dict, where: str) -> dict:
    # A deep copy through JSON: the spec owns its config, and to_dict() stays JSON-safe.
    try:
        return json.loads(json.dumps(config, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ModelSpecError(f"{where}: config is not JSON-serialisable ({e})") from None


def _looks_like_path(x: str) -> bool:
    return os.sep in x or "/" in x or x.endswith(".json") or x.startswith(("~", "."))


# ---------------------------------------------------------------- presets


def _preset_dir():
    return resources.files("memlab.presets")


def _preset_file(name: str):
    return _preset_dir().joinpath(f"{name}.json")


def _preset_names() -> set:
    return {
        entry.name[: -len(".json")]
        for entry in _preset_dir().iterdir()
        if entry.name.endswith(".json")
    }


def _preset_description(name: str) -> str:
    data = _parse_json(_preset_file(name).read_text(encoding="utf-8"), f"preset {name!r}")
    return str(data.get(DESCRIPTION_KEY, ""))


def _unknown_preset_message(name: str) -> str:
    available = sorted(_preset_names())
    close = difflib.get_close_matches(name, available, n=1)
    hint = f" (closest: {close[0]!r})" if close else ""
    return f"model: unknown preset {name!r}{hint}; available: {', '.join(available)}"

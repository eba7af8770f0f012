"""ModelSpec: which model a run fine-tunes, and its tensor shapes.

A ModelSpec is an HF config.json dict plus a name and where it came from
(a preset, a config.json file, a local checkpoint directory, or a dict), for
any causal LM transformers can build. Its parameters are the model's own:
transformers builds it without memory (memlab.shapes) and `tensors()` lists
what `model.named_parameters()` lists, names, shapes, dtypes and order, a
tied weight once, so predictions line up with what the engine partitions.
Only stdlib here: importing memlab must not import torch, transformers or
deepspeed (the derivation runs in a helper process, the engine in a worker);
`hf_config()` imports transformers when a run actually needs it.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from importlib import resources
from typing import Any, NamedTuple, Optional

from . import shapes
from .errors import InputError

DEFAULT_PRESET = "tiny-llama"

# Preset files carry a one-line description under this key; it is not an
# HF config field, so the loader moves it to `spec.description`.
DESCRIPTION_KEY = "_memlab_description"

# Config fields that, where a config has them, are sizes: positive integers (checked before transformers
# builds anything, so the message names the field).
SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "n_embd", "n_layer", "n_head", "num_local_experts",
               "num_experts", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ModelSpecError(InputError):
    """A model name, file or config that memlab cannot use (one-line message)."""


class TensorSpec(NamedTuple):
    name: str
    shape: tuple
    numel: int
    dtype: str = "float32"  # as transformers builds it (the engine casts to run.dtype)


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
        given = os.fspath(path)
        path = os.path.abspath(os.path.expanduser(given))
        if not os.path.exists(path):
            if HUB_ID.fullmatch(given):
                raise ModelSpecError(
                    f"model: {given!r} is not a local path; as a Hugging Face Hub id it needs its config.json "
                    f"here first (memlab reads no network): `huggingface-cli download {given} config.json "
                    f"--local-dir DIR`, then pass DIR")
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
    def structure(self) -> dict:
        """What transformers builds for this config (memlab.shapes.describe): parameters, the input and
        output embeddings, the decoder layers and the last module each runs."""
        try:
            return shapes.describe(self.config)
        except shapes.ShapeError as exc:
            raise ModelSpecError(f"{_where(self.name, self.source)}: {exc}") from None

    def prepare(self, dtype=None, checkpointing=False, attn_implementation=None) -> None:
        """Derive at once (one helper request) the structure and, for `dtype`, what is saved without
        gradient checkpointing and, if `checkpointing`, with it; an error waits for its question.
        `attn_implementation` None: transformers' default for the model."""
        pairs = [(self.config, shapes.describe_question())]
        if dtype is not None:
            pairs.append((self.config, shapes.saved_question(dtype, False, attn_implementation)))
            if checkpointing:
                pairs.append((self.config, shapes.saved_question(dtype, True, attn_implementation)))
        try:
            shapes.prepare(pairs)
        except shapes.ShapeError as exc:
            raise ModelSpecError(f"{_where(self.name, self.source)}: {exc}") from None

    def saved_activations(self, dtype: str, checkpointing: bool,
                          attn_implementation: Optional[str] = None) -> "shapes.SavedActivations":
        """What autograd saves in training, per segment, at any micro batch and sequence length, with
        transformers' attention `attn_implementation` (None: its default for the model)."""
        try:
            if attn_implementation == self.attn_implementation:
                attn_implementation = None  # the default's own question: derived once, whichever way it is named
            terms = shapes.saved_terms(self.config, dtype, checkpointing, attn_implementation)
        except shapes.ShapeError as exc:
            raise ModelSpecError(f"{_where(self.name, self.source)}: activations: {exc}") from None
        return shapes.SavedActivations(terms, self.num_layers)

    @property
    def attn_implementation(self) -> str:
        """The attention transformers builds this model with by default (sdpa where its class has it)."""
        return self.structure["attn_implementation"]

    @property
    def vocab_size(self) -> int:
        return self.structure["vocab_size"]

    @property
    def hidden_size(self) -> int:
        return self.structure["hidden_size"]

    @property
    def num_layers(self) -> int:
        return self.structure["num_layers"]

    @property
    def tied_embeddings(self) -> bool:
        return self.structure["tied"]

    @property
    def torch_dtype(self) -> str:
        return str(self.config.get("torch_dtype") or self.config.get("dtype") or "float32")

    @property
    def checkpoint_dir(self):
        """The local checkpoint directory this spec was read from, or None."""
        return self.source if os.path.isdir(self.source) else None

    def tensors(self) -> list:
        """Every parameter as TensorSpec, in `model.named_parameters()` order."""
        return [TensorSpec(name, tuple(shape), _numel(shape), dtype)
                for name, shape, dtype in self.structure["parameters"]]

    @property
    def num_params(self) -> int:
        return sum(_numel(shape) for _, shape, _ in self.structure["parameters"])

    @property
    def largest_tensor(self) -> TensorSpec:
        # max() keeps the first of equals: embed_tokens before an untied lm_head.
        return max(self.tensors(), key=lambda t: t.numel)

    # ------------------------------------------------------------ transformers

    def hf_config(self):
        """The transformers PretrainedConfig (imports transformers on first use)."""
        import transformers  # lazy: heavy, and only the worker and tests need it

        return transformers.AutoConfig.for_model(**copy.deepcopy(self.config))


def _numel(shape) -> int:
    numel = 1
    for n in shape:
        numel *= n
    return numel


# ---------------------------------------------------------------- validation


def _validate(config: dict, where: str) -> None:
    """What can be said before transformers builds the model; the build itself checks the rest."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelSpecError(f"{where}: missing required field 'model_type'")
    if not isinstance(model_type, str) or not model_type:
        raise ModelSpecError(f"{where}: field 'model_type' must be a name, got {model_type!r}")
    for field in SIZE_FIELDS:
        if config.get(field) is not None:
            _check_size(config, field, where)
    for field in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        value = config.get(field)
        if value is not None and not isinstance(value, bool):
            raise ModelSpecError(f"{where}: field {field!r} must be true or false, got {value!r}")


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

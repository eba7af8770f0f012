"""A model's parameters and the activations it saves, read off the model
transformers builds for its config (memlab.engine.meta_model).

The derivation imports torch and transformers, so it runs in a helper
process (`python -m memlab.engine.meta_model`, kept while questions come,
gone after half a minute idle or with this process): sizing a model from a
notebook never loads torch into its kernel. Answers are cached in memory and
on disk (one JSON file per config and question, under `$MEMLAB_CACHE_DIR`,
else `$XDG_CACHE_HOME/memlab`, else `~/.cache/memlab`), keyed by the config,
the torch and transformers versions and the derivation's code: the first
question about a model costs a helper process (seconds), every later one a
file read or less.
"""
import atexit
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from fractions import Fraction
from importlib import metadata

from .errors import InputError



class ShapeError(InputError):
    """A config transformers cannot build, or whose forward cannot be derived (one line)."""


def describe(config):
    """The model's structure: parameters [[name, shape, dtype]], input_embedding, output_embedding,
    tied, layers (the decoder stack's module name), num_layers, hidden_size, vocab_size, last_modules."""
    return _answer(config, describe_question())


def saved_terms(config, dtype, checkpointing, attn_implementation=None):
    """What autograd saves per segment (before, one entry per layer kind, after), as coefficient lists
    per saved tensor, for micro batch 1 ("one") and more ("many"), with transformers' attention
    `attn_implementation` (None: its default for the model); see meta_model.saved_terms."""
    return _answer(config, saved_question(dtype, checkpointing, attn_implementation))


class SavedActivations:
    """saved_terms evaluated: bytes of each tensor saved before the layers, in each layer, after them."""

    def __init__(self, terms, num_layers):
        self._terms = terms
        self._kind = terms["layer_kind"]
        self.num_layers = num_layers

    @functools.lru_cache(maxsize=256)
    def _sizes(self, batch, seq):
        regime = "one" if batch == 1 else "many"
        out = {}
        for segment, tensors in self._terms["terms"][regime].items():
            out[segment] = tuple(int(_evaluate(c, batch, seq)) for c in tensors)
        return out

    def before(self, batch, seq):
        return self._sizes(batch, seq).get("before", ())

    def after(self, batch, seq):
        return self._sizes(batch, seq).get("after", ())

    def layer(self, index, batch, seq):
        return self._sizes(batch, seq).get(str(self._kind[index]), ())

    def layers(self, batch, seq):
        """Per layer, the sizes of the tensors it saves."""
        return [self.layer(i, batch, seq) for i in range(self.num_layers)]


def _evaluate(coefficients, batch, seq):
    if batch == 1:
        monomials = (seq, seq * seq, 1)
    else:
        monomials = (batch * seq, batch * seq * seq, batch, seq, 1)
    return sum(Fraction(c) * m for c, m in zip(coefficients, monomials))


# ---------------------------------------------------------------- answers


def _answer(config, question):
    key = _key(config, question)
    cached = _memory.get(key)
    if cached is None:
        cached = _read_cache(key)
        if cached is None:
            cached = _derive([(config, question)])[0]
            _write_cache(key, cached)
        _memory[key] = cached
    if "error" in cached:
        raise ShapeError(cached["error"])
    return cached["ok"]


def prepare(pairs):
    """Answer many (config, question) pairs with one request (what an estimate will ask, several models
    for fit): questions already answered are not asked again. Errors wait until the question is asked."""
    missing = []
    for config, question in pairs:
        key = _key(config, question)
        if key in _memory or key in {k for k, _ in missing}:
            continue
        cached = _read_cache(key)
        if cached is not None:
            _memory[key] = cached
        else:
            missing.append((key, (config, question)))
    if missing:
        for (key, _), answer in zip(missing, _derive([item for _, item in missing])):
            _write_cache(key, answer)
            _memory[key] = answer


def describe_question():
    return {"what": "describe"}


def saved_question(dtype, checkpointing, attn_implementation=None):
    question = {"what": "saved", "dtype": dtype, "checkpointing": bool(checkpointing)}
    if attn_implementation is not None:  # the default's question stays the same (and its cache entries)
        question["attn_implementation"] = attn_implementation
    return question


_memory = {}


@functools.lru_cache(maxsize=1)
def _versions():
    """What an answer depends on besides the config: torch, transformers and the derivation's own code."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine", "meta_model.py"), "rb") as f:
        found = {"derivation": hashlib.sha256(f.read()).hexdigest()[:16]}
    for package in ("torch", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _key(config, question):
    text = json.dumps({"config": config, "question": question, "versions": _versions()},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_dir():
    explicit = os.environ.get("MEMLAB_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "memlab")


def _cache_path(key):
    return os.path.join(cache_dir(), "shapes", f"{key}.json")


def _read_cache(key):
    try:
        with open(_cache_path(key)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_cache(key, answer):
    path = _cache_path(key)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(answer, f)
        os.replace(tmp, path)  # whole or not at all: another process may read it now
    except OSError:
        pass  # a read-only home: the answer stays in memory


class _Helper:
    """The helper process, kept while questions come (it exits by itself when idle: asked again, a new one
    starts). One question at a time."""

    def __init__(self):
        self.process = None
        self.lock = threading.Lock()

    def ask(self, request):
        with self.lock:
            for attempt in (1, 2):  # once more if it had just exited idle
                if self.process is None or self.process.poll() is not None:
                    self.process = self._start()
                try:
                    self.process.stdin.write(json.dumps(request) + "\n")
                    self.process.stdin.flush()
                    line = self.process.stdout.readline()
                except (BrokenPipeError, OSError):
                    line = ""
                if line:
                    return json.loads(line)
                stderr = self._close()
                if attempt == 2:
                    raise ShapeError(f"the shape helper failed ({stderr or 'no answer'})")

    def _start(self):
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        try:
            return subprocess.Popen([sys.executable, "-m", "memlab.engine.meta_model"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        except OSError as exc:
            raise ShapeError(f"cannot start the shape helper ({exc})") from None

    def _close(self):
        process, self.process = self.process, None
        if process is None:
            return ""
        process.kill()
        _, stderr = process.communicate()
        lines = (stderr or "").strip().splitlines()
        return lines[-1] if lines else f"exit {process.returncode}"

    def close(self):
        with self.lock:
            self._close()


_helper = _Helper()
atexit.register(_helper.close)


def release():
    """End the helper now (the next question starts a new one): before a run, whose worker needs the RAM."""
    _helper.close()


def forget():
    """Drop the answers this process holds (the disk cache stays), as a new process starts."""
    _memory.clear()


def _derive(items):
    """Answers from the helper process, in order (each {"ok": ...} or {"error": ...})."""
    answer = _helper.ask({"items": [dict(question, config=config) for config, question in items]})
    if "error" in answer:
        raise ShapeError(answer["error"])
    return answer["answers"]

"""What a model is made of, read off the model transformers itself builds.

Torch side of memlab.shapes (which runs it in a helper process, so that a
notebook kernel never imports torch to size a model):

- `describe(config)`: the model built on fake tensors (meta-device shapes)
  with transformers' own class for its model_type (`AutoModelForCausalLM.from_config`): every
  parameter's name, shape and dtype in `named_parameters()` order (a tied
  weight is one Parameter and is listed once), which parameters are the input
  and output embeddings, where the decoder layers are, and the last module
  each layer runs (gradient checkpointing's recompute ends there), and the
  attention implementation transformers picks for it by default.
- `saved_terms(config, dtype, checkpointing, attn_implementation)`: the
  tensors autograd saves for backward (eager attention saves its
  probabilities, sdpa does not), from a forward on fake tensors (torch's FakeTensorMode: the
  CPU kernels' choices and every shape and dtype, no memory), split into the
  part before the first decoder layer, each layer, the part after the last
  one, and the head and loss (which the estimate models itself). Each saved
  tensor's size is solved for as `b*(a*s + q*s^2) + c*s + d` (micro batch b,
  sequence length s) from four forwards and checked on a fifth.
"""
import contextlib
import copy
from fractions import Fraction

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class DerivationError(Exception):
    """The model cannot be built or run on fake tensors; the message says why."""


def hf_config(config):
    import transformers

    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = copy.deepcopy(config)
    model_type = config.pop("model_type", None)
    if model_type not in CONFIG_MAPPING_NAMES:
        close = difflib.get_close_matches(str(model_type), causal_lm_types(), n=3)
        hint = f" (closest: {', '.join(close)})" if close else ""
        raise DerivationError(f"model_type {model_type!r} is not one transformers {transformers.__version__} "
                              f"knows{hint}")
    try:
        return transformers.AutoConfig.for_model(model_type, **config)
    except (ValueError, TypeError, KeyError) as exc:
        raise DerivationError(_one_line(exc)) from None


def causal_lm_types():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _build(config, **options):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg = hf_config(config)
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise DerivationError(f"model_type {cfg.model_type!r} has no causal-LM class in transformers")
    try:
        return transformers.AutoModelForCausalLM.from_config(cfg, **options)
    except Exception as exc:  # transformers checks a config's consistency while it builds the modules
        raise DerivationError(f"transformers cannot build it: {_one_line(exc)}") from None


def _decoder_layers(model):
    """(qualified name, ModuleList) of the decoder stack: the ModuleList holding most parameters."""
    import torch

    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = (name, module), size
    if best is None:
        raise DerivationError(f"{type(model).__name__} has no stack of decoder layers (an nn.ModuleList)")
    return best


def describe(config):
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()  # the meta device's shapes, and a forward that runs
    with mode:
        model = _build(config)
    names = {id(p): name for name, p in model.named_parameters()}
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    layers_name, layers = _decoder_layers(model)
    text = model.config.get_text_config()
    return {
        "class": type(model).__name__,
        "parameters": [[name, list(p.shape), str(p.dtype).removeprefix("torch.")]
                       for name, p in model.named_parameters()],
        "input_embedding": names[id(embedding.weight)],
        "output_embedding": names.get(id(head.weight)) if head is not None else None,
        "tied": head is not None and head.weight is embedding.weight,
        "layers": layers_name,
        "num_layers": len(layers),
        "hidden_size": int(getattr(text, "hidden_size", None) or embedding.weight.shape[1]),
        "vocab_size": int(embedding.weight.shape[0]),
        "last_modules": _last_modules(model, mode, layers_name, layers),
        "attn_implementation": model.config._attn_implementation,  # transformers' default for this class
    }


def _last_modules(model, mode, layers_name, layers):
    """Per decoder layer, the last module with parameters its forward runs (one fake forward)."""
    last = {}
    handles = []
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if any(True for _ in module.parameters(recurse=False)):
                handles.append(module.register_forward_hook(
                    lambda *_, i=index, n=name: last.__setitem__(i, n)))
    try:
        with _grouped_mm_as_on_cpu():
            _forward(model, mode, 1, 8)
    except Exception as exc:
        raise DerivationError(f"its forward does not run on fake tensors: {_one_line(exc)}") from None
    finally:
        for handle in handles:
            handle.remove()
    return [f"{layers_name}.{index}.{last[index]}" if index in last else None for index in range(len(layers))]


def _forward(model, mode, batch, seq):
    import torch

    with mode:
        ids = torch.zeros((batch, seq), dtype=torch.long)
        return model(input_ids=ids, labels=ids)


@contextlib.contextmanager
def _grouped_mm_as_on_cpu():
    """transformers 5 runs fused experts through torch's grouped_mm; its CPU kernel takes any dtype, but the
    meta kernel fake tensors use insists on bf16. Where it would refuse, the fake pass computes the product
    with transformers' own fallback op (which has a fake kernel) inside a function that saves for backward
    what grouped_mm's autograd saves: the input, the weight and the group offsets."""
    try:
        from transformers.integrations import moe
    except ImportError:
        yield
        return
    import torch

    class GroupedMM(torch.autograd.Function):
        @staticmethod
        def forward(ctx, input, weight, offs):
            ctx.save_for_backward(input, weight, offs)
            return torch.ops.transformers.grouped_mm_fallback(input, weight, offs=offs)

        @staticmethod
        def backward(ctx, grad):  # never run: the fake pass stops at the loss
            raise NotImplementedError

    original = moe._grouped_mm

    def grouped_mm(input, weight, offs):
        if weight.dtype == torch.bfloat16:
            return original(input, weight, offs)
        return GroupedMM.apply(input.to(weight.dtype), weight, offs)

    moe._grouped_mm = grouped_mm
    try:
        yield
    finally:
        moe._grouped_mm = original


def _saved_by_segment(model, mode, layers, head, batch, seq):
    """segment -> sizes of the distinct storages autograd saved, in order; segments: "before", each
    layer index, "after" (the final norm), "head" (the output embedding and the loss)."""
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen, kept = set(), []
    segment = ["before"]
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            seen.add(key)
            kept.append(storage)  # alive until all are counted: a freed storage's address can come back
            saved.setdefault(segment[0], []).append(storage.nbytes())
        return tensor

    def enter(name):
        return lambda *_: segment.__setitem__(0, name)

    handles = []
    for index, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(index)))
        handles.append(layer.register_forward_hook(enter("after")))
    handles.append(head.register_forward_pre_hook(enter("head")))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _grouped_mm_as_on_cpu():
            _forward(model, mode, batch, seq)
    finally:
        for handle in handles:
            handle.remove()
    return saved


# A saved tensor's bytes are a sum of these monomials in (b, s). With one sample a view is not copied where
# it is with several (`contiguous()` of a size-1 batch), so b = 1 has terms of its own.
MONOMIALS = {"one": (lambda b, s: s, lambda b, s: s * s, lambda b, s: 1),
             "many": (lambda b, s: b * s, lambda b, s: b * s * s, lambda b, s: b, lambda b, s: s, lambda b, s: 1)}
# Prime lengths and batches: a model's own sizes (head dims, expert counts) are not prime, and a shape that
# equals one of them can turn a copy into a view and change what is saved.
SOLVE_SHAPES = {"one": ((1, 37), (1, 53), (1, 71)), "many": ((2, 37), (3, 37), (2, 53), (3, 53), (2, 71))}
CHECK_SHAPES = {"one": (1, 61), "many": (5, 61)}


def regime(batch):
    return "one" if batch == 1 else "many"


def _solve(regime_name, values):
    """Coefficients of MONOMIALS[regime] through the SOLVE_SHAPES values (exact, Gaussian elimination)."""
    basis = MONOMIALS[regime_name]
    rows = [[Fraction(m(b, s)) for m in basis] + [Fraction(v)] for (b, s), v in zip(SOLVE_SHAPES[regime_name], values)]
    n = len(basis)
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col] / rows[col][col]
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col])]
    return [rows[i][n] / rows[i][i] for i in range(n)]


def evaluate(coefficients, batch, seq):
    """Bytes of one saved tensor at (batch, seq) from its coefficients (of the batch's regime)."""
    return sum(Fraction(c) * m(batch, seq) for c, m in zip(coefficients, MONOMIALS[regime(batch)]))


def _representatives(layers):
    """Indices of the layers that stand for all of them, and per layer the index of its representative.
    Layers of one kind (class, parameters' names and shapes, own settings such as an attention type or a
    sliding window) save alike, except that what they share (rotary tables made before the layers) is
    saved by the first of them only: the first of each kind stands for itself, the second for the rest."""
    seen, first, of = {}, [], []
    for index, layer in enumerate(layers):
        indices = seen.setdefault(_layer_kind(layer), [])
        if len(indices) < 2:
            indices.append(index)
            first.append(index)
        of.append(indices[0] if len(indices) == 1 and indices[0] == index else indices[-1])
    return first, of


def _layer_kind(layer):
    settings = []
    for name, module in layer.named_modules():
        for attr, value in vars(module).items():
            if attr.startswith("_") or "idx" in attr or "index" in attr:
                continue
            if isinstance(value, (bool, int, float, str, type(None))):
                settings.append((name, attr, value))
    shapes = tuple((n, tuple(p.shape), p.dtype) for n, p in layer.named_parameters())
    return type(layer).__name__, shapes, tuple(settings)


def saved_terms(config, dtype, checkpointing, attn_implementation=None):
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    options = {"attn_implementation": attn_implementation} if attn_implementation else {}  # None: the default
    with mode:
        model = _build(config, dtype=getattr(torch, DTYPES[dtype]), **options)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    layers_name, layers = _decoder_layers(model)
    first, of = _representatives(layers)
    parent_name, _, attr = layers_name.rpartition(".")
    parent = dict(model.named_modules())[parent_name] if parent_name else model
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in first]))  # the representatives only
    head = model.get_output_embeddings()
    terms = {}
    for name in MONOMIALS:
        shapes = SOLVE_SHAPES[name] + (CHECK_SHAPES[name],)
        runs = []
        for batch, seq in shapes:
            try:
                runs.append(_saved_by_segment(model, mode, getattr(parent, attr), head, batch, seq))
            except Exception as exc:  # an op without a fake kernel, a data-dependent branch
                raise DerivationError(f"its forward does not run on fake tensors: {_one_line(exc)}") from None
        segments = {}
        for segment in set().union(*runs) - {"head"}:  # the head and the loss: the estimate's own terms
            sizes = [run.get(segment, []) for run in runs]
            if len({len(x) for x in sizes}) != 1:
                raise DerivationError(f"its segment {segment!r} saves a different number of tensors per shape")
            coefficients = [_solve(name, [x[i] for x in sizes[:-1]]) for i in range(len(sizes[0]))]
            for coefficient, checked in zip(coefficients, sizes[-1]):
                if evaluate(coefficient, *shapes[-1]) != checked:
                    raise DerivationError(f"a tensor its segment {segment!r} saves is not linear in the batch "
                                          f"and quadratic in the sequence ({checked} bytes at {shapes[-1]})")
            key = segment if isinstance(segment, str) else str(first[segment])
            segments[key] = [[str(c) for c in coefficient] for coefficient in coefficients]
        terms[name] = segments
    return {"dtype": dtype, "checkpointing": bool(checkpointing), "attn_implementation": attn_implementation,
            "layer_kind": of, "terms": terms}


def _one_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip(": ")


IDLE_SECONDS = 30  # a helper nobody asks for this long exits (it holds torch: hundreds of MiB)


def answer(item):
    try:
        if item["what"] == "describe":
            return {"ok": describe(item["config"])}
        return {"ok": saved_terms(item["config"], item["dtype"], item["checkpointing"], item.get("attn_implementation"))}
    except DerivationError as exc:
        return {"error": str(exc)}


def main():
    """Helper-process entry (memlab.shapes): one JSON request per line on stdin ({"items": [...]}), one
    JSON answer per line on stdout; it ends at EOF, when its parent dies, or after IDLE_SECONDS idle."""
    import ctypes
    import json
    import select
    import signal
    import sys
    import warnings

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: not past its parent
    warnings.filterwarnings("ignore")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        failure = None
    except ImportError as exc:
        failure = f"transformers is not installed ({exc})"
    while select.select([sys.stdin], [], [], IDLE_SECONDS)[0]:
        line = sys.stdin.readline()
        if not line:
            return
        request = json.loads(line)
        if failure:
            reply = {"error": failure}
        else:
            reply = {"answers": [answer(item) for item in request["items"]]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

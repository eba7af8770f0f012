"""Every change memlab makes to DeepSpeed's code goes through this one door.

memlab's probes and its engine optimizations replace a few DeepSpeed (and
torch) functions in the worker process. Each replacement is made with
`replace(owner, name, new)`, which

- refuses to start on a DeepSpeed release these patches were not written
  against (`check_version`, called before the first patch of a process),
- fails loudly when the attribute it replaces is missing (the internals moved),
- keeps the original, so `undo_all()` puts every patched attribute back in
  reverse order (tests use it; a worker never needs to).

`add(owner, name, new)` gives a class a method DeepSpeed does not have, and
fails loudly if a release grew one of that name.

Standard library only at import: DeepSpeed is imported by the callers.
"""
from ..errors import RunError

# [low, high): the DeepSpeed releases whose internals the patches know; keep in
# step with pyproject.toml's range and requirements.lock.
SUPPORTED_DEEPSPEED = ((0, 19), (0, 20))

_MISSING = object()
_patches = []  # (owner, name, previous value or _MISSING), in the order made
_checked = []  # the version once checked in this process


class UnsupportedDeepSpeed(RunError):
    """This DeepSpeed is not one whose internals memlab's patches know (a RuntimeError)."""


def check_version(version=None):
    """Raise UnsupportedDeepSpeed unless `version` (default: the installed
    DeepSpeed's) is in SUPPORTED_DEEPSPEED."""
    if version is None:
        import deepspeed

        version = deepspeed.__version__
    parts = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    low, high = SUPPORTED_DEEPSPEED
    if not (low <= parts < high):
        raise UnsupportedDeepSpeed(
            f"memlab patches DeepSpeed {low[0]}.{low[1]}.x internals; found deepspeed {version}. "
            f"Install a supported version: pip install 'deepspeed>={low[0]}.{low[1]},<{high[0]}.{high[1]}'")


def _check_once():
    if not _checked:
        check_version()
        _checked.append(True)


def original(owner, name):
    """`owner.name` as it is now, or UnsupportedDeepSpeed naming what is missing."""
    if not hasattr(owner, name):
        raise UnsupportedDeepSpeed(f"memlab: {getattr(owner, '__name__', owner)}.{name} is missing in this "
                                   f"DeepSpeed; its internals changed")
    return getattr(owner, name)


def replace(owner, name, new):
    """Set `owner.name = new` (a class or module attribute that must exist),
    keeping what was there for undo_all(); returns the value it replaces."""
    _check_once()
    previous = original(owner, name)
    _patches.append((owner, name, vars(owner).get(name, _MISSING)))  # _MISSING: it was inherited
    setattr(owner, name, new)
    return previous


def add(owner, name, new):
    """Give `owner` an attribute DeepSpeed does not have (a method a patch
    needs); fails loudly if this DeepSpeed has one by that name. Undone too."""
    _check_once()
    if hasattr(owner, name):
        raise UnsupportedDeepSpeed(f"memlab: {getattr(owner, '__name__', owner)}.{name} exists in this DeepSpeed; "
                                   f"memlab's patch would hide it")
    _patches.append((owner, name, _MISSING))
    setattr(owner, name, new)


def installed():
    """'Owner.name' of every patch in place, in the order made."""
    return [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name, _ in _patches]


def undo_all():
    """Put back every patched attribute, latest first."""
    while _patches:
        owner, name, previous = _patches.pop()
        if previous is _MISSING:
            try:
                delattr(owner, name)
            except AttributeError:
                pass
        else:
            setattr(owner, name, previous)

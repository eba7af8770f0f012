"""Stale locks in torch's extension cache, where DeepSpeed builds its ops.

torch's FileBaton marks a build in progress with a `lock` file in the op's
build folder and deletes it when the build ends. A build killed midway leaves
the file, and every later build or load of that op then waits forever,
silently. A lock is stale when no live process works in that folder (ninja
and the compiler run with it as their working directory). memlab did not
create those files, so it does not delete them: it says exactly what to do.
"""
import glob
import os
import sys
import time

from .errors import RunError


class StaleOpLock(RunError):
    """A build lock no live process holds: every later load of that op would
    wait forever. Refused before a run starts, with the command that clears it."""


def extensions_root():
    """Where DeepSpeed's ops are built: TORCH_EXTENSIONS_DIR if set; else, in a
    virtual environment, a folder of its own (ops compiled against this venv's
    DeepSpeed sources: another checkout's build cannot invalidate them mid-run);
    else torch's default cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    if sys.prefix != sys.base_prefix:
        return os.path.join(sys.prefix, "torch_extensions")
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")


def use_extensions_root(env=os.environ):
    """Point torch (in this process, or a child's environment) at extensions_root()."""
    env["TORCH_EXTENSIONS_DIR"] = extensions_root()
    return env


def _busy_folders():
    """Real paths of the working directories of every live process."""
    busy = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                busy.add(os.path.realpath(os.readlink(f"/proc/{pid}/cwd")))
            except OSError:
                continue
    return busy


def stale_locks(root=None):
    """Lock files under the extension cache that no live build holds."""
    root = root or extensions_root()
    locks = glob.glob(os.path.join(root, "*", "lock")) + glob.glob(os.path.join(root, "*", "*", "lock"))
    if not locks:
        return []
    busy = _busy_folders()
    return sorted(lock for lock in locks if os.path.realpath(os.path.dirname(lock)) not in busy)


# torch's loader takes the same lock for a moment when it loads an op that is
# already built (FileBaton around a no-op ninja run): another run starting at
# that moment sees a lock and no process working in the folder yet. A lock is
# stale only if it is still there, unchanged, a little later.
RECHECK_SECONDS = 3.0


def check(root=None, recheck=RECHECK_SECONDS):
    """Raise StaleOpLock with the command that clears it, if any lock is stale."""
    stale = stale_locks(root)
    if stale and recheck:
        seen = {lock: _stamp(lock) for lock in stale}
        time.sleep(recheck)
        stale = [lock for lock in stale_locks(root) if lock in seen and _stamp(lock) == seen[lock]]
    if stale:
        raise StaleOpLock(
            f"a DeepSpeed op build was killed midway and left {stale[0]}; every run would wait for it forever. "
            f"No build is running there: remove it with `rm {' '.join(stale)}` and run again (the op rebuilds)")


def _stamp(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns

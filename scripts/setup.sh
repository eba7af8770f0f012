#!/usr/bin/env bash
# Set up memlab on a fresh machine: system packages, a venv in .venv, the
# package, and DeepSpeed's ops built once. Safe to run again: each step is
# skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages DeepSpeed's ops need to build (libaio for async_io, a C++ compiler).
need=()
pkgs=(libaio-dev g++ make)
# The browser test drives Debian's chromium: Playwright cannot download its own browser here.
case ",${MEMLAB_EXTRAS:-}," in *,test,*) pkgs+=(chromium) ;; esac
for pkg in "${pkgs[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing system packages: ${need[*]}"
    if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
VPY=.venv/bin/python
quiet_pip() {  # pip's output only when it fails: a set-up that works prints one line a step
    local log status=0
    log=$(mktemp)
    $VPY -m pip "$@" >"$log" 2>&1 || status=$?
    [ "$status" -eq 0 ] || cat "$log" >&2
    rm -f "$log"
    return "$status"
}
# The locked environment: every package at the exact version requirements.lock
# names (scripts/lock.py refreshes it), installed without resolving anything,
# so a release upstream cannot change what the suite runs with. torch==2.13.0
# there is the CPU wheel on this machine's disk (pip's find-links).
pin() { grep -E "^$1==" requirements.lock; }
if [ "$($VPY -m pip --version | cut -d' ' -f2)" != "$(pin pip | cut -d= -f3)" ]; then
    quiet_pip install -q "$(pin pip)"
fi
if ! $VPY scripts/lock.py check 2>/dev/null; then
    echo "setup: installing the locked environment (requirements.lock)"
    quiet_pip install -q --no-deps -r requirements.lock
fi
# (asked from / : in this folder python would find ./memlab whether installed or not)
if [ "$(cd / && "$OLDPWD/$VPY" -c 'import memlab, os; print(os.path.dirname(os.path.dirname(memlab.__file__)))' 2>/dev/null)" != "$PWD" ]; then
    echo "setup: installing memlab (editable)"
    quiet_pip install -q --no-deps --no-build-isolation -e .
fi
$VPY -m pip check >/dev/null || { $VPY -m pip check >&2; echo "setup: the locked environment is inconsistent" >&2; exit 1; }
$VPY -c "import memlab, deepspeed, torch" >/dev/null 2>&1 || { echo "setup: install failed" >&2; exit 1; }

# DeepSpeed JIT-builds its ops on first use (minutes): do it once here.
$VPY -m memlab.engine.build_ops
echo "setup: done"

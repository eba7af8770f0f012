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
if ! $VPY -c "import torch" 2>/dev/null; then
    # The CPU build first: an unpinned torch would pull a several-GB CUDA build.
    echo "setup: installing torch 2.13.0 (CPU)"
    $VPY -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    $VPY -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "setup: installing memlab${MEMLAB_EXTRAS:+[$MEMLAB_EXTRAS]}"
$VPY -m pip install -q -e ".${MEMLAB_EXTRAS:+[$MEMLAB_EXTRAS]}" 2>&1 | grep -v "^WARNING: Location" || true
$VPY -c "import memlab, deepspeed, torch" >/dev/null 2>&1 || { echo "setup: install failed" >&2; exit 1; }

# DeepSpeed JIT-builds its ops on first use (minutes): do it once here.
$VPY -m memlab.engine.build_ops
echo "setup: done"

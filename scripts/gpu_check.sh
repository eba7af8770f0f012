#!/usr/bin/env bash
# The GPU check (docs/GPU.md): ONE prepared command for a CUDA machine
# without network whose python has torch (CUDA) and transformers but not
# DeepSpeed or libaio. Prepare it first, on a networked machine:
#
#   bash scripts/gpu_prepare.sh        # fills .whl/ and .deb/ (git-ignored), prints the device call
#   bash scripts/gpu_check.sh          # there, with .whl and .deb carried; results in $OUT
#   bash scripts/gpu_check.sh --check-only   # stop right after the GPU check (no GPU: exit 3, one line)
#   bash scripts/gpu_check.sh --rehearse     # the same steps on DeepSpeed's CPU accelerator, to try the
#                                            # script itself without a GPU (no install: the python given by
#                                            # GPU_CHECK_PYTHON must have DeepSpeed; tiny-llama, 1 step)
#
# Within GPU_CHECK_BUDGET_S (480 s) it: installs the carried wheels (DeepSpeed
# 0.19.8, its missing dependencies, memlab) into a folder of its own, unpacks
# libaio from the .deb files, builds DeepSpeed's ops (async_io, cpu_adam,
# pin_memory) in parallel, pins buffers through both pinning backends
# (torch, native) and measures requested vs reserved bytes, then for each
# configuration (stock: DeepSpeed's engine, torch pinning; memascend: every
# MemAscend switch, native pinning) writes `memlab estimate --json` and makes a
# real run of GPU_CHECK_MODEL (qwen2.5-0.5b) in bf16 with parameters and
# optimizer state on NVMe, GPU_CHECK_STEPS (5) steps, with memlab's probes; and
# writes the comparison table. Results, in $OUT (default ./gpu-check-out; at
# most 8 files, as the device returns them):
#   gpu-compare.md    measured vs predicted (host and GPU bytes per component, pinned-rounding waste)
#   gpu-compare.json  every figure of it
#   gpu-check.log     this script's whole output
#   env.json          the machine (GPU, driver, versions, gloo on CUDA, swap folder)
#   pin-check.json    the pinned-backend measurements
#   estimates.json    each configuration's estimate
#   gpu-smi.csv       nvidia-smi's memory.used through the check
#   runs.tar.gz       the run folders (events.jsonl, summary.json, request.json, worker.log), knobs, manifest
#
# Environment: OUT, GPU_CHECK_BUDGET_S, GPU_CHECK_MODEL, GPU_CHECK_STEPS,
# GPU_CHECK_CONFIGS (stock,memascend; exact_pinning too if time allows),
# GPU_CHECK_SET (space-separated KEY=VALUE knob changes), GPU_CHECK_PYTHON (python3),
# GPU_CHECK_WORK (/tmp/memlab-gpu-check), GPU_CHECK_SWAP_DIR, GPU_CHECK_NVIDIA_SMI (nvidia-smi).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${GPU_CHECK_PYTHON:-python3}
SMI=${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}
STARTED=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-480}

refuse() {  # one line on stderr, nothing installed, nothing written
    echo "gpu_check: $*" >&2
    exit 3
}

REHEARSE=
[ "${1:-}" = "--rehearse" ] && REHEARSE=1

# -- 1. the GPU check: nothing is installed or written before it passes
if [ -n "$REHEARSE" ]; then
    GPU="none (rehearsal on DeepSpeed's CPU accelerator)"
else
    command -v "$SMI" >/dev/null 2>&1 ||
        refuse "no NVIDIA GPU here ($SMI not found); this check runs on a GPU machine (docs/GPU.md)"
    GPU=$("$SMI" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)
    [ -n "$GPU" ] || refuse "no NVIDIA GPU here ($SMI lists none); this check runs on a GPU machine (docs/GPU.md)"
    "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 ||
        refuse "$PY's torch sees no CUDA GPU (nvidia-smi: $GPU)"
fi
echo "gpu_check: GPU: $GPU"
[ "${1:-}" = "--check-only" ] && exit 0

# -- 2. what the device call must carry
ls .whl/*.whl >/dev/null 2>&1 && ls .whl/memlab/memlab-*.whl >/dev/null 2>&1 && ls .deb/*.deb >/dev/null 2>&1 ||
    refuse ".whl/ or .deb/ is missing: run 'bash scripts/gpu_prepare.sh' on a networked machine first and name .whl and .deb in the call's carry"

OUT=${OUT:-$ROOT/gpu-check-out}
WORK=${GPU_CHECK_WORK:-/tmp/memlab-gpu-check}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/gpu-check.log
: >"$LOG"

elapsed() { echo $(($(date +%s) - STARTED)); }
say() { echo "gpu_check: [$(elapsed) s] $*"; }
fail() { say "FAILED: $*"; return 1; }

main() {
    say "GPU: $GPU; output in $OUT, work in $WORK, budget ${BUDGET} s"
    # DeepSpeed's accelerator, for every process below (the runs' workers too)
    if [ -n "$REHEARSE" ]; then export DS_ACCELERATOR=cpu; else export DS_ACCELERATOR=cuda; fi

    # -- 3. install: the carried wheels into a folder of their own, the checkout's memlab first on the path
    if [ -z "$REHEARSE" ]; then
        SITE=$WORK/site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl .whl/memlab/memlab-*.whl || { fail "pip install of the carried wheels"; return 1; }
        export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
        export PATH="$SITE/bin:$PATH"
    else
        export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
        say "rehearsal: no install, $PY's own packages"
    fi
    "$PY" -c "import deepspeed, memlab, pydantic, hjson; print('gpu_check: deepspeed', deepspeed.__version__, 'memlab from', memlab.__file__)" 2>&1 |
        grep -v "real_accelerator" || { fail "import deepspeed / memlab"; return 1; }

    # -- 4. libaio, unpacked where the compiler and the loader look
    AIO=$WORK/aio
    mkdir -p "$AIO"
    for deb in .deb/*.deb; do
        if command -v dpkg >/dev/null; then
            dpkg -x "$deb" "$AIO"
        else  # a .deb is an ar archive holding data.tar.*
            (tmp=$(mktemp -d) && cd "$tmp" && ar x "$ROOT/$deb" && tar xf data.tar.* -C "$AIO" && rm -rf "$tmp")
        fi || { fail "unpacking $deb"; return 1; }
    done
    local libaio libdir
    libaio=$(find "$AIO" -name 'libaio.so*' | head -1)
    [ -n "$libaio" ] || { fail "no libaio.so in .deb/"; return 1; }
    libdir=$(dirname "$libaio")
    # CUDA: async_io links -lcuda, which needs an unversioned libcuda.so: the driver's libcuda.so.1 through a
    # link of our own, else the toolkit's stubs (the loader finds the real driver library at run time)
    local cuda_home stubs= driver= d
    cuda_home=$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)
    if [ -n "$cuda_home" ] && [ -d "$cuda_home/lib64/stubs" ]; then stubs=$cuda_home/lib64/stubs; fi
    local real
    real=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 .*x86-64/ {print $NF; exit}')
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
        if [ -z "$real" ] && [ -e "$d/libcuda.so.1" ]; then real=$d/libcuda.so.1; fi
    done
    if [ -n "$real" ]; then
        mkdir -p "$WORK/libcuda" && ln -sf "$real" "$WORK/libcuda/libcuda.so" && driver=$WORK/libcuda
    fi
    export CPATH="$AIO/usr/include${CPATH:+:$CPATH}"
    export CFLAGS="-I$AIO/usr/include ${CFLAGS:-}" LDFLAGS="-L$libdir ${LDFLAGS:-}"  # DeepSpeed's libaio check reads these
    export LIBRARY_PATH="$libdir${driver:+:$driver}${stubs:+:$stubs}${LIBRARY_PATH:+:$LIBRARY_PATH}"
    export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "libaio in $libdir; CUDA_HOME ${cuda_home:-none}; libcuda.so for linking: ${driver:-(no driver library found)}${stubs:+; stubs $stubs}"

    # -- 5. DeepSpeed's ops, built in parallel into a fresh extensions folder
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$WORK/torch_extensions}
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    if [ -z "$REHEARSE" ]; then
        local arch
        arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
        export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
    fi
    say "building DeepSpeed's ops into $TORCH_EXTENSIONS_DIR ($MAX_JOBS jobs each)"
    local pids=() op
    for op in AsyncIOBuilder CPUAdamBuilder PinMemoryBuilder; do
        "$PY" -c "
import sys, time
from deepspeed.accelerator import get_accelerator
b = get_accelerator().create_op_builder('$op')
if b is None or not b.is_compatible(verbose=True):
    sys.exit('$op is not compatible here')
t = time.time(); b.load(verbose=True); print('$op ready in %.0f s (built, or loaded if built before)' % (time.time() - t))
" >"$WORK/build-$op.log" 2>&1 &
        pids+=($!)
    done
    local i=0 failed=0
    for op in AsyncIOBuilder CPUAdamBuilder PinMemoryBuilder; do
        if wait "${pids[$i]}"; then
            say "$(tail -1 "$WORK/build-$op.log")"
        else
            say "building $op failed; the end of its log:"
            tail -25 "$WORK/build-$op.log"
            failed=1
        fi
        i=$((i + 1))
    done
    [ "$failed" = 0 ] || { fail "DeepSpeed op builds"; return 1; }
    "$PY" -m memlab.engine.build_ops 2>&1 | grep -v "real_accelerator" || true  # memlab's own view: all there

    # -- 6. the machine's facts, nvidia-smi in the background
    "$PY" "$ROOT/scripts/gpu_runs.py" env --out "$OUT/env.json" 2>&1 | grep -v "real_accelerator" ||
        say "env facts incomplete (see env.json)"
    # memlab's worker uses gloo; where gloo cannot run ZeRO-3's collectives on CUDA tensors, the runs use nccl
    if ! "$PY" -c "
import json, os, sys
gloo = (json.load(open(sys.argv[1])) if os.path.exists(sys.argv[1]) else {}).get('gloo_on_cuda') or {}
sys.exit(0 if all(v == 'ok' for v in gloo.values()) else 1)" "$OUT/env.json" 2>/dev/null; then
        export MEMLAB_GPU_DIST_BACKEND=nccl
        say "gloo fails on CUDA tensors here (env.json, gloo_on_cuda): the runs use nccl"
    fi
    SMI_PID=
    if [ -z "$REHEARSE" ]; then
        "$SMI" --query-gpu=timestamp,memory.used,memory.total,utilization.gpu --format=csv,noheader,nounits \
            -lms 500 >"$OUT/gpu-smi.csv" 2>/dev/null &
        SMI_PID=$!
    fi

    # -- 7. pinned memory through both backends, measured
    local model=${GPU_CHECK_MODEL:-qwen2.5-0.5b} steps=${GPU_CHECK_STEPS:-5}
    [ -n "$REHEARSE" ] && model=${GPU_CHECK_MODEL:-tiny-llama} steps=${GPU_CHECK_STEPS:-1}
    "$PY" "$ROOT/scripts/gpu_pin_check.py" --model "$model" --dtype bf16 --out "$OUT/pin-check.json" ||
        say "pin check incomplete (see pin-check.json)"
    say "pin check done"

    # -- 8. each configuration: memlab estimate --json, then a real run (until the deadline)
    local ram_gib hardware=(--gpus 0) sets=()
    ram_gib=$(awk '/MemTotal/ {printf "%.0f", $2 / 1048576}' /proc/meminfo)
    if [ -z "$REHEARSE" ]; then
        hardware=(--gpus 1 --gpu-mem-gib
            "$("$PY" -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))")")
    fi
    for kv in ${GPU_CHECK_SET:-}; do sets+=(--set "$kv"); done
    local deadline=$((STARTED + BUDGET - 25))
    PYTHONUNBUFFERED=1 "$PY" "$ROOT/scripts/gpu_runs.py" runs --work "$WORK" --model "$model" --steps "$steps" \
        --configs "${GPU_CHECK_CONFIGS:-stock,memascend}" ${sets[@]+"${sets[@]}"} "${hardware[@]}" \
        --ram-gib "$ram_gib" --deadline "$deadline" 2>&1 | grep -v "real_accelerator"
    local runs_status=${PIPESTATUS[0]}
    [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
    say "runs done (status $runs_status)"

    # -- 9. the table, and the runs packed
    "$PY" "$ROOT/scripts/gpu_compare.py" --manifest "$WORK/manifest.json" --env "$OUT/env.json" \
        --pin-check "$OUT/pin-check.json" --smi "$OUT/gpu-smi.csv" --md "$OUT/gpu-compare.md" \
        --json "$OUT/gpu-compare.json" || { fail "gpu_compare.py"; return 1; }
    "$PY" - "$WORK" "$OUT/estimates.json" <<'EOF'
import glob, json, os, sys
work, out = sys.argv[1:]
estimates = {os.path.basename(p)[len("estimate-"):-len(".json")]: json.load(open(p))
             for p in sorted(glob.glob(os.path.join(work, "estimate-*.json")))}
json.dump(estimates, open(out, "w"), indent=1)
EOF
    (cd "$WORK" && tar czf "$OUT/runs.tar.gz" --exclude='*.swp' manifest.json knobs-*.json estimate-*.json \
        build-*.log runs 2>/dev/null) || say "packing the runs failed"
    say "table: $OUT/gpu-compare.md"
    cat "$OUT/gpu-compare.md"
    say "done in $(elapsed) s"
    return "$runs_status"
}

main 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"

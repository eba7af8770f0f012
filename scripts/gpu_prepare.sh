#!/usr/bin/env bash
# Prepare the GPU check (scripts/gpu_check.sh, docs/GPU.md). Run it HERE, on a
# networked machine, before the device call: the GPU machine has no network.
#
#   bash scripts/gpu_prepare.sh
#
# Fills two git-ignored folders that the device call carries:
#   .whl/        cp312 manylinux x86_64 wheels of what the device's python (3.12,
#                torch 2.11 + CUDA, transformers 5.x; the package list in the
#                device docs, KINDS.md) lacks: DeepSpeed 0.19.8 (an sdist on PyPI,
#                pure Python: built into a wheel here; its ops are JIT-built there)
#                and the dependencies missing there (hjson, pydantic and its own);
#   .whl/memlab/ memlab's own wheel, built from this checkout;
#   .deb/        libaio (runtime and -dev) from this Debian's archive, for async_io;
# checks that every requirement of every carried wheel is either carried or on
# the device, and prints the exact `run` invocation. Run it again after a
# change to memlab (its wheel is a copy of the code; the check itself runs the
# checkout's code, the wheel only installs memlab's metadata and command).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=.whl
DEB=.deb

# The device's python packages (KINDS.md, "Python packages already there"), lower-case, '_' as '-'.
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp"
# memlab requirements the check never imports (the notebook views and the lab's UI): not carried.
NOT_NEEDED="plotly anywidget ipywidgets jupyterlab ipykernel"
# Carried: missing on the device (typing-extensions is there, but pydantic-core needs a recent one).
WANT="hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions"
FALLBACK="hjson==3.1.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing_extensions==4.16.0 deepspeed==0.19.8"

pin() {  # NAME -> NAME==VERSION: requirements.lock's where it names it (what the tests run with), else the fallback
    local name=$1 line
    if [ -f requirements.lock ]; then
        line=$(grep -iE "^${name//[-_]/[-_]}==" requirements.lock | head -1 || true)
        [ -n "$line" ] && { echo "$line"; return; }
    fi
    tr ' ' '\n' <<<"$FALLBACK" | grep -iE "^${name//[-_]/[-_]}==" | head -1
}

mkdir -p "$WHL/memlab" "$DEB"
rm -f "$WHL"/*.whl "$WHL"/memlab/*.whl "$DEB"/*.deb  # this script's own earlier output
echo "gpu_prepare: wheels for the device's Python 3.12 (manylinux x86_64) into $WHL/"
for name in $WANT; do
    spec=$(pin "$name")
    [ -n "$spec" ] || { echo "gpu_prepare: no version for $name" >&2; exit 1; }
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "$spec" 2>&1 \
        | grep -v "^WARNING: Location" || true
    ls "$WHL"/*.whl 2>/dev/null | grep -qi "/${name//[-_]/[-_]}-" || { echo "gpu_prepare: $spec: no cp312 manylinux wheel" >&2; exit 1; }
done
ds=$(pin deepspeed)
if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHL" "$ds" >/dev/null 2>&1; then
    echo "gpu_prepare: $ds has no wheel on the index: building one from its sdist (pure Python; ops are JIT-built there)"
    "$PY" -m pip wheel -q --no-deps -w "$WHL" "$ds" 2>&1 | grep -v "^WARNING: Location" || true
fi
ls "$WHL"/deepspeed-*.whl >/dev/null 2>&1 || { echo "gpu_prepare: no DeepSpeed wheel" >&2; exit 1; }
echo "gpu_prepare: memlab's wheel from this checkout into $WHL/memlab/"
src=$(mktemp -d)  # a copy of the working tree: no build/ left here, no stale file from an earlier build in the wheel
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do if [ -f "$f" ]; then printf '%s\0' "$f"; fi; done |
    xargs -0 cp --parents -t "$src"
"$PY" -m pip wheel -q --no-deps -w "$WHL/memlab" "$src" 2>&1 | grep -v "^WARNING: Location" || true
rm -rf "$src"
ls "$WHL"/memlab/memlab-*.whl >/dev/null 2>&1 || { echo "gpu_prepare: memlab's wheel did not build" >&2; exit 1; }

echo "gpu_prepare: every carried wheel's requirements, against the device's packages and what is carried"
DEVICE_HAS="$DEVICE_HAS" NOT_NEEDED="$NOT_NEEDED" "$PY" - "$WHL"/*.whl "$WHL"/memlab/*.whl <<'EOF'
import os, re, sys, zipfile
try:
    from packaging.markers import Marker
except ImportError:
    from pip._vendor.packaging.markers import Marker

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

device = {norm(n) for n in os.environ["DEVICE_HAS"].split()}
not_needed = {norm(n) for n in os.environ["NOT_NEEDED"].split()}
wheels = sys.argv[1:]
carried = {norm(os.path.basename(w).split("-")[0]) for w in wheels}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    needs = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line[len("Requires-Dist:"):].partition(";")
        if marker.strip() and not Marker(marker.strip()).evaluate(env):
            continue  # an extra, or another python/platform
        name = norm(re.split(r"[\s<>=!~\[(]", req.strip(), 1)[0])
        where = "carried" if name in carried else "on the device" if name in device else \
            "not needed by the check" if name in not_needed else "MISSING"
        needs.append(f"{name} ({where})")
        if where == "MISSING":
            missing.append(f"{os.path.basename(wheel)} needs {name}")
    print(f"  {os.path.basename(wheel)}: " + (", ".join(needs) or "no requirements"))
if missing:
    sys.exit("gpu_prepare: missing on the device and not carried: " + "; ".join(missing))
EOF

echo "gpu_prepare: libaio .deb files into $DEB/ (DeepSpeed's async_io op links it)"
arch=$(dpkg --print-architecture)
apt_opts=()
if [ "$arch" != amd64 ]; then  # the device is x86-64: amd64 packages from an amd64 list
    apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/memlab-apt-amd64)
    mkdir -p /tmp/memlab-apt-amd64/partial
    apt-get "${apt_opts[@]}" update -qq
fi
apt-cache "${apt_opts[@]}" show libaio-dev >/dev/null 2>&1 || apt-get "${apt_opts[@]}" update -qq
runtime=
for name in libaio1t64 libaio1; do  # Debian 13 / Ubuntu 24.04 renamed libaio1 to libaio1t64
    if apt-cache "${apt_opts[@]}" show "$name" >/dev/null 2>&1; then runtime=$name; break; fi
done
[ -n "$runtime" ] || { echo "gpu_prepare: neither libaio1t64 nor libaio1 is in this machine's apt lists" >&2; exit 1; }
(cd "$DEB" && apt-get "${apt_opts[@]}" download -qq "$runtime" libaio-dev 2>&1 | grep -v "unsandboxed" || true)
ls "$DEB"/libaio-dev_*.deb "$DEB"/${runtime}_*.deb >/dev/null || { echo "gpu_prepare: apt-get download failed" >&2; exit 1; }

echo "gpu_prepare: ready"
ls -l "$WHL"/*.whl "$WHL"/memlab/*.whl "$DEB"/*.deb | awk '{printf "  %10d  %s\n", $5, $NF}'
carried=$(du -sk "$WHL" "$DEB" | awk '{s += $1} END {print s}')
tree=$(git ls-files -co --exclude-standard -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
echo "gpu_prepare: carried ${carried} KiB + working tree ${tree} KiB (the device call takes 64 MiB in all)"
cat <<'EOF'

The device call (one command, about 8 minutes; see docs/GPU.md):

  run(command="bash scripts/gpu_check.sh", carry=[".whl", ".deb"], timeout_s=600)

Its results come back under files_at: gpu-compare.md (the table), gpu-compare.json,
gpu-check.log, env.json, pin-check.json, estimates.json, gpu-smi.csv, runs.tar.gz.
EOF

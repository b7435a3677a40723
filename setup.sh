#!/usr/bin/env bash
# Create .venv and install pinned, known-good versions. Idempotent.
#   ./setup.sh          runtime packages
#   ./setup.sh --dev    plus test/lint tools (requirements-dev.txt)
# torch is chosen here, not in requirements.txt: the CUDA build where nvidia-smi
# finds a GPU, the CPU build otherwise (an unpinned torch would pull gigabytes of
# CUDA wheels onto a CPU machine).
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.13.0
DEV=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option '$arg' (valid: --dev)" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
else
  echo "[setup] .venv exists: reusing it"
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

have_torch=$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [[ "$have_torch" == "$TORCH_VERSION"* ]]; then
  echo "[setup] torch $have_torch already installed"
elif [ "$(uname -s)" = "Darwin" ]; then
  echo "[setup] macOS: installing torch==$TORCH_VERSION (CPU/MPS build)"
  "${PIP[@]}" "torch==$TORCH_VERSION"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] GPU found ($(nvidia-smi -L | head -1)): installing CUDA torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION"
else
  echo "[setup] no GPU: installing CPU torch==$TORCH_VERSION+cpu"
  # A local wheelhouse (pip's find-links) is used when it has the CPU build;
  # otherwise PyTorch's CPU index, never PyPI's CUDA build.
  "${PIP[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || "${PIP[@]}" "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

# MLX's Linux CPU wheel ships a reference BLAS (~3 GFLOP/s); Debian's OpenBLAS, preloaded
# for MLX processes only, made its training steps 3-4x faster here. Optional.
if [ "$(uname -s)" = Linux ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's libopenblas0-pthread (faster MLX on the CPU)"
    (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) \
      || echo "[setup] could not install libopenblas0-pthread: MLX will use its slow BLAS"
  else
    echo "[setup] tip: 'sudo apt-get install libopenblas0-pthread' makes MLX on the CPU 3-4x faster"
  fi
fi

echo "[setup] installing requirements.txt"
"${PIP[@]}" -r requirements.txt
if [ "$DEV" = 1 ]; then
  echo "[setup] installing requirements-dev.txt"
  "${PIP[@]}" -r requirements-dev.txt
fi

# A one-node Slurm for tests/test_slurm.py (Debian's slurmctld, slurmd, munge), which skips,
# saying why, without it. Optional: setup goes on whatever apt says.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
if [ "$DEV" = 1 ] && [ "$(uname -s)" = Linux ] \
   && ! { have slurmctld && have slurmd && have munged && have sbatch; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's slurmctld, slurmd and munge (a one-node Slurm for the tests)"
    apt_log=$(mktemp)
    if ! (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq \
          && apt-get install -y -qq --no-install-recommends slurmctld slurmd munge) >"$apt_log" 2>&1; then
      echo "[setup] could not install slurmctld/slurmd/munge ($(tail -n 1 "$apt_log")): the Slurm test will skip"
    fi
    rm -f "$apt_log"
  else
    echo "[setup] no Slurm here: the Slurm test skips (as root with apt-get, ./setup.sh --dev installs it)"
  fi
fi

.venv/bin/python - <<'PY'
import shutil
import torch
cuda = torch.cuda.is_available()
print(f"[setup] torch {torch.__version__}; CUDA: {'yes, ' + torch.cuda.get_device_name(0) if cuda else 'no'}; "
      f"bf16: {'yes' if (torch.cuda.is_bf16_supported() if cuda else True) else 'no'}; "
      f"compile: {'yes' if torch._dynamo.is_dynamo_supported() and (cuda or shutil.which('g++') or shutil.which('c++')) else 'no (eager)'}")
PY
echo "[setup] done: activate with 'source .venv/bin/activate'"

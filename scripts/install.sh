#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install fedlora into it.
#
#   scripts/install.sh          # runtime only
#   scripts/install.sh dev      # + test / lint tools
#
# torch: where the environment has no torch yet, pin the CPU build
# (TORCH_SPEC, default torch==2.13.0) before anything else asks for torch, so
# that pip never resolves an unpinned torch to a multi-GB CUDA build. Set
# TORCH_SPEC (and PIP_EXTRA_INDEX_URL) to choose another build, e.g. for a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
extra="${1:-}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "install: creating $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip >/dev/null

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "install: no torch in $VENV; installing $TORCH_SPEC (CPU build)"
  "${PIP[@]}" install -q "$TORCH_SPEC"
fi

target="."
[ "$extra" = "dev" ] && target=".[dev]"
echo "install: fedlora ($target)"
"${PIP[@]}" install -q -e "$target"
"$VENV/bin/fedlora" --version >/dev/null

# The HTML privacy report's test renders it in headless Chromium. Optional: without
# a browser that test skips; where apt-get can install one, do so quietly.
if [ "$extra" = "dev" ] && ! command -v chromium >/dev/null 2>&1 \
   && ! command -v chromium-browser >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  if { $SUDO apt-get update -qq \
       && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1
  then
    echo "install: chromium installed (for the HTML report test)"
  else
    echo "install: could not install chromium with apt-get; the HTML report test will skip"
  fi
fi
echo "install: done ($("$VENV/bin/python" -c 'import torch, flwr; print("torch", torch.__version__, "· flwr", flwr.__version__)'))"

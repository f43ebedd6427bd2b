#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install MedGen into it.
# Usage: scripts/setup_env.sh [EXTRAS]   e.g. "samples" (demo) or "test" (test suite)
# Installs the CPU build of PyTorch when torch is missing (enough for the demo and tests; for a GPU
# install a CUDA build of torch into .venv first, or use Slicer's PyTorch extension inside Slicer).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-samples}"
python_bin="${PYTHON:-python3}"

"$python_bin" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "MedGen needs Python >= 3.10")'
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
py=.venv/bin/python

stamp=".venv/.medgen-installed-$extras"
want="$(cat pyproject.toml scripts/constraints.txt scripts/nnunet-checker-requirements.txt | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "[setup] installing MedGen ($extras) into .venv (first run takes a few minutes)" >&2
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0+cpu" 2>/dev/null \
    || "$py" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch \
    || "$py" -m pip install -q torch
fi
# The pins are the versions the tests last ran with; some of them need a newer Python than 3.10 (numpy 2.3+ and
# scipy 1.16+ need 3.11), so where they cannot install, pip resolves the newest versions this Python takes.
pins=(-c scripts/constraints.txt)
if ! "$py" -m pip install -q "${pins[@]}" -e ".[$extras]"; then
  echo "[setup] the pinned versions (scripts/constraints.txt) do not install on $("$py" -V 2>&1); installing the newest compatible ones" >&2
  pins=()
  "$py" -m pip install -q -e ".[$extras]"
fi
# deepbet's wheel ships the pretrained 3D brain-extraction weights the demo adapts; MedGen reads the
# weights only (never imports deepbet), so none of its GUI/processing dependencies are needed.
"$py" -m pip install -q "${pins[@]}" --no-deps deepbet
if [ "$extras" = "test" ]; then
  # nnU-Net v2's own dataset checker validates our exports in the tests. Its full dependency set
  # (dynamic-network-architectures -> timm -> torchvision) would replace the CPU torch with a
  # multi-GB CUDA build, and the checker needs none of those, so nnunetv2 comes without them.
  "$py" -m pip install -q "${pins[@]}" --no-deps nnunetv2
  "$py" -m pip install -q "${pins[@]}" -r scripts/nnunet-checker-requirements.txt
fi
echo "$want" > "$stamp"

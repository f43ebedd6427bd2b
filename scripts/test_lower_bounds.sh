#!/usr/bin/env bash
# The test suite at the lowest versions pyproject.toml admits (scripts/lower-bounds.txt), in .venv-lower-bounds.
# Usage: scripts/test_lower_bounds.sh [pytest arguments]. Downloads a CUDA build of torch 2.8 (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-lower-bounds
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q -c scripts/lower-bounds.txt -e ".[test]"
"$py" -m pip install -q -c scripts/lower-bounds.txt --no-deps deepbet nnunetv2  # as scripts/setup_env.sh does
"$py" -m pip install -q -c scripts/lower-bounds.txt -r scripts/nnunet-checker-requirements.txt
"$py" -m pip list --format=freeze | grep -i -E '^(numpy|torch|monai|einops|simpleitk|nibabel|safetensors|jsonschema|psutil|tqdm|peft|triton)==' >&2
exec "$py" -m pytest Testing "$@"

#!/usr/bin/env bash
# Quick start, command 2: set up .venv with the test extras and run the test suite (CPU, fixed seeds).
# Extra arguments go to pytest, e.g. scripts/test.sh -m 'not slow'  (leaves out the longer integration checks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python -m pytest Testing "$@"

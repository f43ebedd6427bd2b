#!/usr/bin/env bash
# Quick start, command 1: set up .venv and run the MedGen demo on the offline sample data (CPU is fine).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh samples
exec .venv/bin/medgen demo --out demo_output "$@"

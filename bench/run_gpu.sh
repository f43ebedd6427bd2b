#!/usr/bin/env bash
# Runs the GPU benchmarks behind the README's "On a GPU" tables, one stage per call, so that each stage
# fits a 10-minute command on a lent GPU machine. Results go to bench/results/*_cuda.json, or to
# $MEDGEN_BENCH_RESULTS when set (a trial run), and are copied from there to $OUT when it is set (as on the
# device machine).
#
#   bash bench/run_gpu.sh smoke          # the README demo on the GPU: its tiny trainers and generators through the worker
#   bash bench/run_gpu.sh lmi            # LMI map vs the unfold port: clean box sums, Triton clean, Triton compat
#   bash bench/run_gpu.sh lmi-sweep      # Triton kernel: candidate blocks × warps at 128³ (compat), vs one port run
#   bash bench/run_gpu.sh translation    # translation wall time, 2.5D, DDIM 50 then the released 1000-step DDPM
#   bash bench/run_gpu.sh maskgen        # mask-conditioned synthesis at 128³ vs MONAI's ControlNet inferer
#   bash bench/run_gpu.sh synthesis|peft # paired synthesis at 160×160×128; PEFT at 96³
#
# Python: $PYTHON (default python3), with a CUDA build of torch. A machine that lacks some of pyproject.toml's
# dependencies (MONAI, SimpleITK, nibabel, ...) can take their wheels from .whl/ (pip download --no-deps -d .whl
# PACKAGES on a networked machine): they are unpacked into a temporary site directory, not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"usage: bash bench/run_gpu.sh smoke|lmi|lmi-sweep|translation|maskgen|synthesis|peft"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
python=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null && ! "$python" -c "import monai" 2>/dev/null; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$python" -c "import sys, torch; torch.cuda.is_available() or sys.exit('bench/run_gpu.sh: no CUDA device visible to torch'); print(torch.cuda.get_device_name(0))"

case "$stage" in
  smoke)  # the CPU tests never run the CUDA branches; this trains and samples each tiny model on the GPU
    timeout 560 "$python" -c "import sys; from medgen.cli.main import main; sys.exit(main(sys.argv[1:]))" demo --device cuda \
      --out "$(mktemp -d)" ;;
  lmi)
    "$python" bench/bench_lmi.py --device cuda --mode clean --backend torch
    "$python" bench/bench_lmi.py --device cuda --mode clean --backend triton
    "$python" bench/bench_lmi.py --device cuda --mode compat --backend triton ;;
  lmi-sweep)
    timeout 560 "$python" bench/bench_lmi.py --device cuda --kernel-sweep || echo "stopped (time limit or error, see above): the results file holds what finished" ;;
  translation)
    timeout 560 "$python" bench/bench_translation.py --device cuda --modes 2.5d || echo "stopped at the time limit: the results file holds what finished" ;;
  maskgen)
    "$python" bench/bench_maskgen.py --device cuda --full ;;
  synthesis)
    "$python" bench/bench_synthesis.py --device cuda ;;
  peft)
    "$python" bench/bench_peft.py --device cuda --paper-unet ;;
  *)
    echo "unknown stage: $stage" >&2; exit 2 ;;
esac
if [ -n "${OUT:-}" ]; then
  cp "${MEDGEN_BENCH_RESULTS:-bench/results}"/*cuda*.json "$OUT"/
fi

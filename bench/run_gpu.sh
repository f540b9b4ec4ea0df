#!/usr/bin/env bash
# Every GPU benchmark in one go, for a lent H100/H200 machine with no network (see bench/README
# in SPEC §19/§25): archc and lark travel as wheels in .whl/ (build them with
#   pip wheel --no-deps . -w .whl && pip download --no-deps lark==1.3.1 -d .whl).
# Usage: bash bench/run_gpu.sh OUTDIR [total seconds] [parts: kernels,families,suite; default all].
# Writes at most 7 files under OUTDIR; the suite prints
# every row to the log as it is measured, so a run cut short keeps its numbers there.
set -uo pipefail
OUT=${1:?usage: run_gpu.sh OUTDIR [seconds]}
BUDGET=${2:-480}
PARTS=${3:-kernels,families,suite}
ROOT=$PWD
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/archc-site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/archc-site:$ROOT     # archc from the wheel, bench/ from the checkout
mkdir -p "$OUT/eager" "$OUT/compiled"
LOG="$OUT/log.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} >"$LOG" 2>&1
start=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - start) )); }
# 1. generated kernels on the stdlib models' captured operands (fused regions + families)
if [[ $PARTS == *kernels* ]]; then
  timeout $(( $(left) * 40 / 100 )) python3 bench/gpu.py --no-tune --out "$OUT" --budget-s $(( $(left) * 30 / 100 )) >>"$LOG" 2>&1
  echo "== gpu.py exit $? at $(( $(date +%s) - start )) s" >>"$LOG"
fi
# 2. kernel families at realistic shapes
if [[ $PARTS == *families* ]]; then
  timeout $(( $(left) * 45 / 100 )) python3 bench/gpu_families.py --out "$OUT" --budget-s $(( $(left) * 30 / 100 )) >>"$LOG" 2>&1
  echo "== gpu_families.py exit $? at $(( $(date +%s) - start )) s" >>"$LOG"
fi
# 3. generated modules vs hand-written PyTorch on the GPU, eager then torch.compile
# (run from /tmp: `python -m` puts the working directory first on sys.path, and the checkout's
# archc/ folder is not the installed package)
if [[ $PARTS == *suite* ]]; then
  (cd /tmp && timeout $(( $(left) * 35 / 100 )) python3 -m bench --device cuda --only eager --repeat 10 --out "$OUT/eager") >>"$LOG" 2>&1
  echo "== suite eager exit $? at $(( $(date +%s) - start )) s" >>"$LOG"
  (cd /tmp && timeout $(( $(left) - 15 )) python3 -m bench --device cuda --only compiled --repeat 10 --out "$OUT/compiled") >>"$LOG" 2>&1
  echo "== suite compiled exit $? at $(( $(date +%s) - start )) s" >>"$LOG"
fi
rm -f "$OUT"/*/*.png "$OUT"/*/*.json    # the .md holds the numbers; 8 files come back at most
ls -R "$OUT" >>"$LOG"

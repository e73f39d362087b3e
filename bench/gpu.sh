#!/usr/bin/env bash
# The one command a GPU session runs: the test suite on the GPU (no interpreter), then the
# benchmarks, with logs and JSON (device, versions, git commit inside) written to OUTDIR.
# The GPU machine has torch, triton, transformers and pytest but no network: nothing is installed;
# the package runs from this checkout. Keep the whole run well inside 10 minutes.
#
#   bash bench/gpu.sh OUTDIR        # then copy what is worth keeping into bench/results/
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUTDIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" 2>&1
python -c "import json, sys; sys.path.insert(0, 'bench'); import harness, torch; \
print(json.dumps(harness.run_metadata(torch.device('cuda')), indent=2))" > "$out/env.json" || status=1

echo "== tests (GPU) =="
timeout 240 python -m pytest tests -q -p no:cacheprovider --junitxml="$out/tests.xml" \
  2>&1 | tee "$out/tests.log" || status=1

echo "== kernel benchmark =="
timeout 300 python bench/bench_kernels.py --json "$out/bench_kernels.json" \
  2>&1 | tee "$out/bench_kernels.log" || status=1

echo "== generation benchmark =="
timeout 300 python bench/bench_generate.py --out "$out/bench_generate.json" \
  2>&1 | tee "$out/bench_generate.log" || status=1

exit $status

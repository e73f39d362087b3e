#!/usr/bin/env bash
# The one command a GPU session runs: the test suite on the GPU (no interpreter), then the
# benchmarks, with logs and JSON (device, versions, git commit inside) written to OUTDIR.
# The GPU machine has torch, triton, transformers and pytest but no network: nothing is installed;
# the package runs from this checkout.
#
#   bash bench/gpu.sh OUTDIR                    # every stage
#   bash bench/gpu.sh OUTDIR tests kernels      # some stages (to split a run across 10-minute calls)
# Stages: tests kernels generate sft. Then copy what is worth keeping into bench/results/.
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUTDIR [stage ...]}
shift
stages=${*:-tests kernels generate sft}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0

# run NAME TIMEOUT_S COMMAND...: one stage, its output in OUTDIR/NAME.log, failures remembered.
run() {
  local name=$1 limit=$2
  shift 2
  echo "== $name =="
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" 2>&1
python -c "import json, sys; sys.path.insert(0, 'bench'); import harness, torch; \
print(json.dumps(harness.run_metadata(torch.device('cuda')), indent=2))" > "$out/env.json" || status=1

for stage in $stages; do
  case $stage in
    tests)    run tests 240 python -m pytest tests -q -p no:cacheprovider --junitxml="$out/tests.xml" ;;
    kernels)  run bench_kernels 300 python bench/bench_kernels.py --json "$out/bench_kernels.json" ;;
    generate) run bench_generate 300 python bench/bench_generate.py --out "$out/bench_generate.json" ;;
    sft)      run bench_sft 300 python bench/bench_sft.py --out "$out/bench_sft.json" ;;
    *) echo "unknown stage $stage (tests kernels generate sft)"; status=1 ;;
  esac
done
exit $status

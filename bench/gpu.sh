#!/usr/bin/env bash
# The one command a GPU session runs: the CUDA extension built in place (fusedrl.kernels._C, for this
# GPU's arch only, to keep the build short), the suite's GPU tests (the paths no CPU run reaches),
# then `fusedrl bench all` at the Qwen2.5-0.5B shape (docs/bench.md), with logs and results (device,
# versions, commit inside) written to OUTDIR; more stages on request. The GPU machine has torch,
# triton, nvcc, ninja, transformers and pytest but no network and no `datasets`; the package is
# installed editable from this checkout (no dependencies fetched, no build isolation: the image has
# them). What it lacks (datasets and trl, peft, pytest-xdist) comes as wheels in .whl/, fetched here
# beforehand by `prepare` and carried by every call; they are installed into a private folder, never
# over the image's packages.
#
#   bash bench/gpu.sh plan                     # the visit's calls, in order, minutes each
#   bash bench/gpu.sh rehearse                 # HERE, on the CPU: the plan's bench stages, --quick
#   bash bench/gpu.sh prepare                  # HERE, before the visit: .whl/ (wheels, COMMIT, Triton cache)
#   bash bench/gpu.sh --bundle OUTDIR callN    # planned call N: its stages within its minutes
#   bash bench/gpu.sh [--bundle] [--minutes M] OUTDIR STAGE...   # some stages (all: none named)
# --bundle: OUTDIR.tar.gz, OUTDIR removed (also when a stage fails or the call's time runs out);
# --minutes: the call's limit (each stage's timeout is cut to what is left, a stage with no time
# left is skipped and said so, and the bundle is written before the device would stop the call).
# Stages: build tests tests_gpu tests_rest smoke bench_all suite_headline suite_rest suite_kernels
# suite_generate suite_train suite_rl moe_decode kernels linear_tune rl_ops
# attention generate generate_unfused generate_qwen3 sampler exact sft train_step profile ppo ppo_tokens
# ppo_lora ppo_lora_trl grpo demo traffic. `build` also copies the extension into OUTDIR (carried by
# later calls on a fresh machine: see `plan`). `fusedrl bench` writes every row the moment it is
# measured (OUTDIR/bench_*/results.jsonl, results.json, results.md), within the stage's minutes
# (max_minutes=): a cut call keeps every row it finished. Triton's cache lives in the tree
# (.triton-cache, git-ignored), so a call on the same machine reuses the compiles of the one
# before, and a fresh machine's first call starts from the cache `prepare` built (see
# prebuild_triton_cache); OUTDIR/triton_cache.txt has its file count at the call's start and end (an
# unchanged count over a stage: every kernel was a cache hit) and the prebuilt cache's hits, and
# OUTDIR/triton_compiles.jsonl every kernel the bench compiled (commit it: the next prebuild reads
# it). Then copy what is worth keeping into bench/results/.
#
# The commit: .whl/COMMIT, written by `prepare` from git here (the device's copy of the tree need not
# hold .git), else git's, else "unknown" (harness.git_commit); in OUTDIR/COMMIT, in every result's
# JSON, and in OUTDIR/env.json with the device, driver, torch, Triton, CUDA, nvcc, NCCL and
# transformers versions.
set -uo pipefail
ALL_STAGES="build tests smoke bench_all moe_decode kernels linear_tune rl_ops attention generate generate_unfused generate_qwen3 \
sampler exact sft train_step profile ppo ppo_tokens ppo_lora ppo_lora_trl grpo demo traffic"
# The suite's chunks (stage: test paths and marker expression). The process-starting modules
# (integration: torchrun ranks on gloo, the `fusedrl` command on the CPU) prove nothing about the GPU
# and stay out; the GPU smoke stage runs NCCL.
declare -A CHUNK_PATHS=([tests_gpu]="tests" [tests_rest]="tests")
declare -A CHUNK_MARKS=([tests_gpu]="gpu and not integration" [tests_rest]="not gpu and not integration")
EXTENSION=kernels/_C.cpython-312-x86_64-linux-gnu.so  # the image's Python 3.12

# Seconds each stage of the visit may take (its timeout) at most; the chunks are stopped by SIGINT
# (pytest reports what ran) and killed 20 s later, so a chunk's limit holds 20 s of margin.
# Measured on an H100 (2026-11-26 and bench/results/2026-11-27-h100): the build 30 s, tests_gpu
# 52-55 s (62-71 s on an H200, bench/results/2026-11-28-h200: 25 tests, the 90 s limit's SIGINT
# came in pytest's teardown after the last of them), tests_rest 194 s (12 workers), the machine's
# start ~35 s, a call's install and records ~20 s; the headline set 360 s on a warm Triton cache (its transformers decode peer 63 s, the GRPO
# loss's four processes 87 s, the PPO rows lost to memory the GRPO row's process kept: all since
# fixed, not yet measured again), the kernels suite's first 12 cases in 86 s.
declare -A LIMIT_S=([build]=60 [smoke]=90 [tests_gpu]=100 [tests_rest]=215 [bench_all]=185
                   [suite_headline]=330 [suite_rest]=185 [suite_kernels]=300
                   [suite_generate]=120 [suite_train]=120 [suite_rl]=180 [profile]=120)
# Stages that take what is left of their call (its deadline less the bundle) rather than their
# LIMIT_S (theirs when a stage runs with no call limit, and under `rehearse`): the last of a call.
REST_OF_CALL="suite_headline suite_rest profile"
# suite_rest: the other suites in one stage, one after the other, each until the stage's deadline
# (the kernels suite first: its rows are the fewest in the headline set).
REST_SUITES="kernels train generate rl"
# Stages that need the GPU (or run the whole test suite): `rehearse` skips them on the CPU.
GPU_ONLY="build tests tests_gpu tests_rest smoke"
SETUP_S=40   # install, the wheels, the environment record
# TRL 1.x and Liger, first on the bench's path (GRPO's peer, the fused heads) before the tests' trl
# 0.29.1 (PPO's peer): on the device installed here from .whl/trl1; `rehearse` takes the CI's
# folder of them (.ci-trl), so the rehearsal's peers meet the visit's path.
TRL1_DIR=/tmp/fusedrl-trl1
BUNDLE_S=15  # the record and the archive, after the last stage

# The visit: a lent GPU gives 15 minutes of device time in all, the machine's start included, so 2
# calls and 10 minutes of commands; one device call per line, `minutes|stages|carry`, what matters
# most first. Call 1 builds the extension (30 s: the cuda backend's rows) and gives the rest of its
# 7 minutes (~5.5 after the install and the build) to the headline set, one row per claim of the
# GPU bars, ours first and the slow peers last (the rows past its minutes say `not run: time`);
# call 2 carries the extension from call 1's bundle, runs the GPU tests (55 s) and gives the rest
# of its 3 minutes to what no visit has measured, then the profile of the paths that missed their
# bars (the decode kernels' launch shapes timed against cuBLAS, bench/tune_decode.py, a row at a
# time; the micro-batch replayed from a CUDA graph; decode calls at batch 256 and 1, a training
# micro-batch, PPO's two losses: which tiles and splits would spend less, and where the time
# goes). The other suites'
# rows and the rest of the tests (tests_rest, ~200 s) do not fit beside them: a visit with minutes
# to spare runs them in calls of their own. Every call carries .whl (datasets and the peers the tests import,
# COMMIT and the prebuilt Triton cache).
PLAN=(
  "7|build suite_headline|.whl"
  "3|tests_gpu profile|.whl $EXTENSION"
)

# stage_limit STAGE MINUTES STAGES: STAGE's seconds in a call of MINUTES running STAGES: its
# LIMIT_S, or for a stage of REST_OF_CALL what the call's other stages, its setup and bundle leave.
stage_limit() {
  local stage=$1 minutes=$2 others=0 other
  if [[ " $REST_OF_CALL " != *" $stage "* ]]; then echo "${LIMIT_S[$stage]}"; return; fi
  for other in $3; do [ "$other" = "$stage" ] || others=$((others + LIMIT_S[$other])); done
  echo $((minutes * 60 - SETUP_S - others - BUNDLE_S))
}

# prepared: whether .whl/COMMIT (prepare's) names this tree's commit, said in one line; a stale one
# would label every result of the visit with another commit (harness.git_commit reads it first).
# -dirty as harness.git_commit has it: any change git sees, untracked files included.
prepared() {
  local want dirty=""
  [ -z "$(git status --porcelain)" ] || dirty="-dirty"
  want="$(git rev-parse HEAD)$dirty"
  if [ ! -f .whl/COMMIT ]; then
    echo "not prepared: no .whl/COMMIT here (bash bench/gpu.sh prepare)"; return 1
  fi
  if [ "$(cat .whl/COMMIT)" != "$want" ]; then
    echo "STALE: .whl/COMMIT is $(cat .whl/COMMIT), this tree is $want: run bash bench/gpu.sh prepare again"
    return 1
  fi
  echo "prepared: .whl/COMMIT is this tree's commit, $want"
}

print_plan() {
  local i=0 total=0 minutes stages carry stage limits
  (cd "$(dirname "$0")/.." && prepared) || true
  echo "Here, before call 1: bash bench/gpu.sh prepare  (.whl/: the wheels, COMMIT and the prebuilt"
  echo "Triton cache)."
  echo "Each call: the device tool's run with command \"bash bench/gpu.sh --bundle \$OUT/visitN callN\""
  echo "(N the call's number), timeout_s 60 x its minutes, and carry as listed; it returns"
  echo "\$OUT/visitN.tar.gz, also when a stage fails or its time runs out. Before call 2:"
  echo "  tar xzf FILES_AT/visit1.tar.gz -C /tmp visit1/$(basename "$EXTENSION") && cp /tmp/visit1/$(basename "$EXTENSION") $EXTENSION"
  echo "(the extension is a git-ignored build output: carry sends it along to a fresh machine)."
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r minutes stages carry <<< "$entry"
    i=$((i + 1))
    total=$((total + minutes))
    limits=$SETUP_S
    for stage in $stages; do limits=$((limits + $(stage_limit "$stage" "$minutes" "$stages"))); done
    limits=$((limits + BUNDLE_S))
    printf 'call %d (%d min, limits %d s): %s; carry: %s\n' "$i" "$minutes" "$limits" "$stages" "$carry"
    for stage in $stages; do
      [[ " $REST_OF_CALL " == *" $stage "* ]] || continue
      printf '  %s: the rest of the call, until its deadline less the bundle: at least %d s' \
        "$stage" "$(stage_limit "$stage" "$minutes" "$stages")"
      printf ' (what\n' 
      printf '  the limits leave), more when the stages before it end early\n'
    done
  done
  echo "plan: $i calls, $total minutes"
}

# prepare: the wheels (tests/tools/peer_wheels.sh), the commit under test and the prebuilt Triton
# cache, all in .whl/ (git-ignored, carried by every call). Without the cache (its build failed, and
# said why) the visit compiles its kernels, as before.
prepare() {
  local dirty="" repo
  repo=$(cd "$(dirname "$0")/.." && pwd)
  bash "$repo/tests/tools/peer_wheels.sh" || return 1
  [ -z "$(git status --porcelain)" ] || dirty="-dirty"
  echo "$(git rev-parse HEAD)$dirty" > "$repo/.whl/COMMIT"
  echo "commit: $(cat "$repo/.whl/COMMIT")"
  prebuild_triton_cache "$repo" || echo "no prebuilt Triton cache: the visit compiles its kernels"
}

# prebuild_triton_cache REPO: .whl/triton-cache.tar.gz and its manifest .whl/triton-cache.json,
# the kernels the visits recorded (bench/results/*/call*/triton_compiles.jsonl) and the static
# check's workload compiled for sm_90 under the key of the GPU image's Triton 3.6 on Python 3.12
# (tests/tools/triton_prebuild.py; ~5 min on 2 cores); kept while kernels/, the prebuild's code and
# the records are unchanged. A call seeds an empty TRITON_CACHE_DIR with it; its triton_cache.txt
# gives the hits.
prebuild_triton_cache() {
  local repo=$1 stamp tmp records code
  shopt -s nullglob
  records=("$repo"/bench/results/*/call*/triton_compiles.jsonl)
  shopt -u nullglob
  # the kernels, the prebuild's own code (what it compiles and how: the workload takes
  # tune_decode's launch shapes) and the records
  local sources=(kernels tests/tools/gpucheck tests/tools/triton_prebuild.py bench/tune_decode.py)
  stamp="$(git -C "$repo" rev-parse "${sources[@]/#/HEAD:}" | sha256sum | cut -c1-16)$(git -C \
    "$repo" diff --quiet HEAD -- "${sources[@]}" || echo -dirty) $(cat /dev/null "${records[@]}" \
    | sha256sum | cut -c1-16)"
  if [ -f "$repo/.whl/triton-cache.json" ] && [ "$(cat "$repo/.whl/triton-cache.stamp" 2> /dev/null)" = "$stamp" ]; then
    echo "prebuilt Triton cache: kernels/, the prebuild and the records unchanged, kept"; return 0
  fi
  (cd "$repo" && .ci/target_install python .ci-triton36 "triton==3.6.0" "numpy<2.4") || return 1
  tmp=$(mktemp -d /tmp/fusedrl-prebuild.XXXXXX)
  (cd "$repo" && env -u TRITON_INTERPRET -u TRITON_DEFAULT_FP_FUSION PYTHONPATH=.ci-triton36 \
    python tests/tools/triton_prebuild.py --out "$tmp" --records "${records[@]}") \
    && tar czf "$repo/.whl/triton-cache.tar.gz" -C "$tmp" cache \
    && cp "$tmp/manifest.json" "$repo/.whl/triton-cache.json" \
    && echo "$stamp" > "$repo/.whl/triton-cache.stamp"
  code=$?
  rm -rf "$tmp"
  return $code
}

# bench_stage STAGE SECONDS [--quick]: the `fusedrl bench` command of a suite_* or bench_all stage,
# output in OUTDIR/bench_*; each suite runs until the stage's seconds less 15 (the record's last
# write), its deadline less START_S (the process's start: imports, the device, its limits); a suite
# with no time left is skipped and said so.
START_S=25
bench_stage() {
  local stage=$1 seconds=$2 quick=${3:-} suites minutes end=$((SECONDS + $2 - 15))
  case $stage in
    bench_all) suites=all ;;
    suite_rest) suites=$REST_SUITES ;;
    *) suites=${stage#suite_} ;;
  esac
  for suite in $suites; do
    if [ $((end - SECONDS - START_S)) -lt 6 ]; then
      echo "fusedrl bench $suite: not run, the stage's time is spent"; continue
    fi
    minutes=$(python -c "print(($end - $SECONDS - $START_S) / 60)")
    PYTHONPATH="$TRL1_DIR${PYTHONPATH:+:$PYTHONPATH}" python -m fusedrl.engine.cli bench \
      "$suite" $quick model=qwen2.5-0.5b max_minutes="$minutes" output_dir="$out/bench_$suite" \
      overwrite=true || return 1
  done
}

# rehearse: the plan's stages here, on the CPU, --quick (the GPU's stages skipped, and said so),
# each stage's seconds printed: a visit that would break is found before a GPU comes.
rehearse() {
  local entry minutes stages stage start took code=0 i=0
  out=$(mktemp -d /tmp/fusedrl-rehearse.XXXXXX)
  cd "$(dirname "$0")/.." || return 1
  prepared || code=1  # the stages still run: what else would break is found too
  if [ -d .ci-trl/trl ]; then
    TRL1_DIR=$PWD/.ci-trl
  else
    echo "no .ci-trl (TRL 1.x, Liger): the peers run with this environment's trl alone, not the visit's path"
  fi
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r minutes stages _ <<< "$entry"
    i=$((i + 1))
    for stage in $stages; do
      if [[ " $GPU_ONLY " == *" $stage "* ]]; then
        echo "call $i $stage: skipped (needs the GPU)"
        continue
      fi
      start=$SECONDS
      if [ "$stage" = profile ]; then
        timeout "${LIMIT_S[$stage]}" python bench/profile_steps.py --out "$out/profile" --quick
      else
        bench_stage "$stage" "${LIMIT_S[$stage]}" --quick
      fi > "$out/$stage.log" 2>&1 || code=1
      took=$((SECONDS - start))
      echo "call $i $stage: $took s (limit ${LIMIT_S[$stage]} s$([ "$took" -gt "${LIMIT_S[$stage]}" ] \
        && echo ": over it, on this CPU")), exit $code; log $out/$stage.log"
      # a peer the visit's path would not run either: its row says so, and so does this
      grep -h "^\[.*| not installed" "$out/$stage.log" | sed "s/^/  peer not run: /"
    done
  done
  echo "rehearsal: $SECONDS s, exit $code"
  return $code
}

if [ "${1:-}" = plan ]; then
  print_plan
  exit 0
fi
if [ "${1:-}" = rehearse ]; then
  rehearse
  exit
fi
if [ "${1:-}" = prepare ]; then
  prepare
  exit
fi
bundle=0
minutes=0
while [ $# -gt 0 ]; do
  case $1 in
    --bundle) bundle=1; shift ;;
    --minutes) minutes=$2; shift 2 ;;
    *) break ;;
  esac
done
out=${1:?usage: bench/gpu.sh plan | prepare | [--bundle] [--minutes M] OUTDIR [callN | stage ...]}
shift
stages=${*:-$ALL_STAGES}
if [[ $stages =~ ^call([0-9]+)$ ]] && [ "${BASH_REMATCH[1]}" -ge 1 ] \
    && [ "${BASH_REMATCH[1]}" -le "${#PLAN[@]}" ]; then
  IFS='|' read -r minutes stages _ <<< "${PLAN[$((BASH_REMATCH[1] - 1))]}"
fi
# The call's end (SECONDS), leaving the record and the archive their time; 0: no limit.
deadline=0
[ "$minutes" -gt 0 ] && deadline=$((minutes * 60 - BUNDLE_S))
repo=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "$out" && cd "$out" && pwd)  # absolute: the stages run from the repository
cd "$repo"
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR="$repo/.triton-cache"
unset TRITON_INTERPRET
mkdir -p "$TRITON_CACHE_DIR"
# A fresh machine's empty cache takes the kernels prebuilt by `prepare`; every Triton compile of the
# bench's processes is recorded (bench/triton_compiles.py), for the next prebuild and the hits below.
if [ -f .whl/triton-cache.tar.gz ] && [ -z "$(ls -A "$TRITON_CACHE_DIR")" ]; then
  tar xzf .whl/triton-cache.tar.gz -C "$TRITON_CACHE_DIR" --strip-components 1 \
    && echo "seeded from .whl/triton-cache.tar.gz (prebuilt on the CPU machine)" > "$out/triton_cache.txt"
fi
export FUSEDRL_TRITON_COMPILES="$out/triton_compiles.jsonl"
echo "start: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files in TRITON_CACHE_DIR" >> "$out/triton_cache.txt"
status=0

# The record and (with --bundle) the archive: on every way out, a failed stage or an interrupt too.
finish() {
  trap - EXIT INT TERM
  echo "stages: $stages; exit status $status; $SECONDS s" >> "$out/stages.txt"
  echo "end: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files in TRITON_CACHE_DIR" >> "$out/triton_cache.txt"
  # The kernels the bench used that the prebuilt cache held (hits) and the names of the others.
  if [ -f "$FUSEDRL_TRITON_COMPILES" ] && [ -f .whl/triton-cache.json ]; then
    python -m fusedrl.bench.triton_compiles hits "$FUSEDRL_TRITON_COMPILES" .whl/triton-cache.json \
      2>&1 | tee -a "$out/triton_cache.txt"
  fi
  if [ "$bundle" = 1 ]; then
    # The device returns at most 8 files: the whole OUTDIR as one archive.
    tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out" || status=1
    echo "bundled: $out.tar.gz"
  fi
  exit "$status"
}
trap finish EXIT
trap 'echo "interrupted"; status=1; exit' INT TERM

# left WANT_S: a stage's timeout, WANT_S cut to what is left of the call (no call limit: WANT_S).
left() {
  if [ "$deadline" -eq 0 ]; then echo "$1"; return; fi
  local rest=$((deadline - SECONDS))
  echo $(( $1 < rest ? $1 : rest ))
}

# The commit under test, written here by `prepare` (the device's tree may have no .git).
[ -f .whl/COMMIT ] && export FUSEDRL_COMMIT=$(cat .whl/COMMIT)
# The import names fusedrl.kernels / fusedrl.engine need the install (package_dir mapping); the
# extension is built by the `build` stage, not here.
FUSEDRL_SKIP_CUDA_BUILD=1 python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { echo "pip install -e . failed:"; tail -n 20 "$out/install.log"; status=1; exit; }
# After the install: fusedrl.bench is importable from here on.
python -c "from fusedrl.bench import harness; print(harness.git_commit())" \
  > "$out/COMMIT" || status=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/fusedrl-peers .whl/*.whl \
    >> "$out/install.log" 2>&1 && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/fusedrl-peers" || status=1
  # TRL 1.x and Liger apart (the tests pin trl 0.29.1, the PPO peer): first on bench_all's path.
  python -m pip install -q --no-index --no-deps --no-compile --target "$TRL1_DIR" .whl/trl1/*.whl \
    >> "$out/install.log" 2>&1 || status=1
else
  echo "no .whl/ wheels: the tests that import datasets, trl or peft fail to collect"; status=1
fi

# run NAME TIMEOUT_S COMMAND...: one stage, its output in OUTDIR/NAME.log, failures remembered;
# its timeout cut to the call's time left, skipped (and said so) when under 10 s are left.
run() {
  local name=$1 limit
  limit=$(left "$2")
  shift 2
  echo "== $name =="
  if [ "$limit" -lt 10 ]; then
    echo "$name: skipped, the call's time is spent" | tee "$out/$name.log"; status=1; return
  fi
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$out/$name.log" || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/nvidia-smi.csv" 2>&1
# The environment record: device, driver, torch, Triton, CUDA, nvcc, NCCL, transformers, commit.
python - "$out/env.json" "$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2> /dev/null | head -n 1)" \
  "$(nvcc --version 2> /dev/null | tail -n 1)" <<'PY' || status=1
import json, sys
import torch
from fusedrl.bench import harness
record = harness.run_metadata(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
record.update(driver=sys.argv[2] or None, nvcc=sys.argv[3] or None)
with open(sys.argv[1], "w") as f:  # under "meta", as every JSON result kept in bench/results/
    json.dump({"meta": record}, f, indent=2)
print(json.dumps(record))
PY

build_extension() {
  local arch limit
  limit=$(left "${LIMIT_S[build]}")
  if [ "$limit" -lt 10 ]; then
    echo "build: skipped, the call's time is spent" | tee "$out/build_ext.log"; status=1; return
  fi
  arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  if FUSEDRL_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" timeout "$limit" \
      python setup.py build_ext --inplace > "$out/build_ext.log" 2>&1; then
    echo "built for sm_${arch/./}"
    cp kernels/_C*.so "$out/" || status=1
    python -c "from fusedrl.kernels import cuda_ext; cuda_ext.require(); print('fusedrl.kernels._C loads')" \
      2>&1 | tee -a "$out/build_ext.log" || status=1
  else
    status=1
    echo "build failed (the cuda backend's tests will be skipped); end of $out/build_ext.log:"
    tail -n 30 "$out/build_ext.log"
  fi
}

# One chunk of the suite on the GPU (no interpreter), spread over the cores with pytest-xdist when it
# is there, stopped by SIGINT at its limit (pytest then reports what ran) and killed 20 s later;
# its last line comes from tests/tools/pytest_tally.py's per-test record, so a cut chunk still ends in
# "NAME: N passed, N failed, N skipped, N errors in S s[, cut by its timeout]".
run_chunk() {
  local name=$1 parallel=() start code limit
  limit=$(( $(left "${LIMIT_S[$name]}") - 20 ))
  if python -c "import xdist" 2> /dev/null; then
    parallel=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
  fi
  echo "== $name =="
  if [ "$limit" -lt 10 ]; then
    echo "$name: skipped, the call's time is spent" | tee "$out/$name.log"; status=1; return
  fi
  rm -f "$out/$name.tally"
  start=$SECONDS
  # shellcheck disable=SC2086  # the chunk's paths split on spaces
  FUSEDRL_TALLY="$out/$name.tally" PYTHONPATH="tests/tools${PYTHONPATH:+:$PYTHONPATH}" \
    timeout -k 20 -s INT "$limit" python -m pytest ${CHUNK_PATHS[$name]} -m "${CHUNK_MARKS[$name]}" \
    -q -p no:cacheprovider -p pytest_tally "${parallel[@]}" --durations=15 \
    --junitxml="$out/$name.xml" > "$out/$name.log" 2>&1
  code=$?
  tail -n 40 "$out/$name.log"
  [ "$code" -eq 0 ] || status=1
  # No test reported and a failure: under xdist a worker's collection error reaches the log only as
  # the controller's internal error naming some test; the collection alone, in this process, says
  # what stopped it (seconds, and only then).
  if [ "$code" -ne 0 ] && [ ! -s "$out/$name.tally" ] && [ "$(left 60)" -ge 30 ]; then
    echo "$name: no test reported; the collection alone, without xdist:" | tee -a "$out/$name.log"
    # shellcheck disable=SC2086
    timeout "$(left 60)" python -m pytest ${CHUNK_PATHS[$name]} -m "${CHUNK_MARKS[$name]}" \
      --collect-only -q -p no:cacheprovider 2>&1 | grep -v -i "warn" | tail -n 15 | tee -a "$out/$name.log"
  fi
  python tests/tools/pytest_tally.py "$out/$name.tally" "$name" "$((SECONDS - start))" "$code" | tee -a "$out/$name.log"
}

for stage in $stages; do
  case $stage in
    build)    echo "== CUDA extension (fusedrl.kernels._C) =="; build_extension ;;
    tests)    for chunk in tests_gpu tests_rest; do run_chunk "$chunk"; done ;;
    tests_gpu|tests_rest) run_chunk "$stage" ;;
    # NCCL on one GPU: a 1-rank cpu:gloo,cuda:nccl group through tensor parallelism (decode graphs
    # capturing the collectives), expert parallelism's all_to_all, FSDP2 CPU offload + FusedAdamW.
    smoke)    run smoke "${LIMIT_S[smoke]}" python -m torch.distributed.run --standalone --nproc-per-node 1 \
                tests/tools/smoke_nccl.py ;;
    # Every suite at the Qwen2.5-0.5B shape, ours beside the peers carried in .whl/: results.json,
    # results.md and charts in OUTDIR/bench, written after each suite.
    # `fusedrl bench` (bench_all: every suite; suite_headline: the headline set; suite_rest: the
    # other suites, each its share of the stage; suite_kernels ... one suite), each suite in
    # OUTDIR/bench_SUITE, its deadline the stage's time left.
    bench_all|suite_headline|suite_rest|suite_kernels|suite_generate|suite_train|suite_rl)
              want=${LIMIT_S[$stage]}
              # the last stage of a call: what is left of it (no call limit: its LIMIT_S)
              [[ " $REST_OF_CALL " == *" $stage "* ]] && [ "$deadline" -gt 0 ] && want=$deadline
              run "$stage" "$want" bash -c "$(declare -f bench_stage); out='$out'; \
                REST_SUITES='$REST_SUITES'; START_S=$START_S; bench_stage $stage \
                $(left "$want")" ;;
    moe_decode) run bench_moe_decode 240 python bench/bench_moe_decode.py --out "$out/bench_moe_decode.json" ;;
    kernels)  run bench_kernels 300 python bench/bench_kernels.py --ops token_logprobs,linear_token_logprobs \
                --json "$out/bench_kernels.json" ;;
    # linear_token_logprobs' fused GEMMs per tile shape against cuBLAS's GEMM of the same FLOPs, at
    # the bar's shape: sets linear_logprobs.fused_tiles.
    linear_tune) run tune_linear_logprobs 300 python tests/tools/tune_linear_logprobs.py \
                   --json "$out/tune_linear_logprobs.json" ;;
    # The small RL ops at 256x2048, 1024x4096 (host-bound: host us and launches per call) and 8192x2048.
    rl_ops)   run bench_rl_ops 570 python bench/bench_kernels.py --budget 0.5 \
                --ops kl_penalty,gae,masked_whiten,ppo_policy_loss,ppo_value_loss --json "$out/bench_rl_ops.json" ;;
    attention) run bench_attention 300 python bench/bench_attention.py --json "$out/bench_attention.json" ;;
    # Fixed shapes (batch 1, 32, 256) against transformers, then the mixed-length case (256 requests).
    generate) run bench_generate 420 python bench/bench_generate.py --out "$out/bench_generate.json" ;;
    # The same decode with torch's GEMM after each norm: decides fuse_decode_gemms's default by measurement.
    generate_unfused) run bench_generate_unfused 300 python bench/bench_generate.py --skip-hf --mixed 0 \
                        --unfused-decode-gemms --out "$out/bench_generate_unfused.json" ;;
    generate_qwen3) run bench_generate_qwen3 420 python bench/bench_generate.py --model qwen3-0.6b --skip-hf \
                      --out "$out/bench_generate_qwen3.json" ;;
    # The sampler's GPU time per step at batch 1/32/256 (greedy, top-p 0.9, top-k 50) beside one logits read.
    sampler)  run bench_sampler 120 python bench/bench_sampler.py --out "$out/bench_sampler.json" ;;
    # Exact on-policy mode: decode cost vs the default at batch 1 and 128, the gap it closes.
    exact)    run bench_exact 300 python bench/bench_exact.py --out "$out/bench_exact.json" ;;
    sft)      run bench_sft 300 python bench/bench_sft.py --out "$out/bench_sft.json" ;;
    # A micro-batch's forward + backward (bar: 1k tokens <= 15 ms) and the optimizer step.
    train_step) run bench_train_step 300 python bench/bench_train_step.py --out "$out/bench_train_step.json" ;;
    # the last stage of a call: what is left of it (no call limit: its LIMIT_S)
    profile)  want=${LIMIT_S[profile]}
              [ "$deadline" -gt 0 ] && want=$deadline
              run profile "$want" python bench/profile_steps.py --out "$out/profile" ;;
    ppo)      run bench_ppo 420 python bench/bench_ppo.py --out "$out/bench_ppo.json" ;;
    # Ours alone, each minibatch's 32 rows (128 + 256 tokens) packed into one forward by
    # ppo.tokens_per_microbatch instead of 16-row micro-batches: compare with stage ppo's ours.
    ppo_tokens) run bench_ppo_tokens 300 python bench/bench_ppo.py --sides ours --tokens-per-microbatch 12288 \
                  --out "$out/bench_ppo_tokens.json" ;;
    # PPO with rank-16 LoRA vs full fine-tuning at the same batch (bar: peak <= 0.6x, no slower), then
    # against TRL with PEFT (needs peft among the carried wheels: tests/tools/peer_wheels.sh).
    ppo_lora) run bench_ppo_lora 570 python bench/bench_ppo.py --lora 16 --sides ours ours_lora \
                --out "$out/bench_ppo_lora.json" ;;
    ppo_lora_trl) run bench_ppo_lora_trl 570 python bench/bench_ppo.py --lora 16 --sides ours_lora trl_lora \
                --out "$out/bench_ppo_lora_trl.json" ;;
    # One GRPO iteration (16 prompts x 8 samples, verifiable reward) against TRL's GRPOTrainer.
    grpo)     run bench_grpo 420 python bench/bench_ppo.py --algo grpo --out "$out/bench_grpo.json" ;;
    # `fusedrl demo` (bf16-mixed on CUDA) for seeds 0, 1, 2: each prints its gain over SFT and wall time
    # (bars: >= +25 points for each seed, <= 20 s for seed 0); results in OUTDIR/demo_seedS/results.json.
    # Each seed's seconds said (the first pays the Triton compiles the cache lacks); its compiles
    # recorded for the next prebuild, as the bench's are.
    demo)     run demo 570 bash -c 'for s in 0 1 2; do start=$SECONDS; python -m fusedrl.bench.triton_compiles \
                fusedrl demo seed=$s output_dir="$1/demo_seed$s" overwrite=true || exit 1;
                echo "demo seed $s: $((SECONDS - start)) s"; done' _ "$out" ;;
    # Bytes of one decode step on the GPU's (fused) paths: divide by bench_generate's step time.
    traffic)  run traffic 300 python tests/tools/traffic.py --json "$out/traffic.json" --table "$out/traffic.md" ;;
    *) echo "unknown stage $stage (expected callN or one of: $ALL_STAGES ${!LIMIT_S[*]})"; status=1 ;;
  esac
done

#!/usr/bin/env bash
# The one command a GPU session runs: the CUDA extension built in place (fusedrl.kernels._C, for this
# GPU's arch only, to keep the build short), the test suite on the GPU in chunks (no interpreter; the
# cuda backend's tests run when the build succeeded), a smoke test of NCCL on one GPU, then the
# benchmarks, with logs and JSON (device, versions, git commit inside) written to OUTDIR. The GPU
# machine has torch, triton, nvcc, ninja, transformers and pytest but no network; the package is
# installed editable from this checkout (no dependencies fetched, no build isolation: the image has
# them). The peers it lacks (trl for bench_ppo.py) come as wheels in .whl/, fetched beforehand by
# bench/peer_wheels.sh and carried with the call; they are installed into a private folder, never over
# the image's packages.
#
#   bash bench/gpu.sh plan                         # the first visit's calls, in order, minutes each
#   bash bench/gpu.sh OUTDIR                       # every stage
#   bash bench/gpu.sh [--bundle] OUTDIR STAGE...   # some stages; --bundle: OUTDIR.tar.gz, OUTDIR removed
# Stages: build tests tests_kernels tests_model tests_engine smoke moe_decode kernels linear_tune rl_ops
# attention generate generate_unfused generate_qwen3 sampler exact sft train_step ppo ppo_tokens ppo_lora
# ppo_lora_trl grpo demo traffic. `build` also copies the extension into OUTDIR (carried by later
# calls on a fresh machine: see `plan`). Then copy what is worth keeping into bench/results/.
set -uo pipefail
ALL_STAGES="build tests smoke moe_decode kernels linear_tune rl_ops attention generate generate_unfused generate_qwen3 \
sampler exact sft train_step ppo ppo_tokens ppo_lora ppo_lora_trl grpo demo traffic"
# The suite's chunks (stage: test paths), each under CHUNK_S seconds so a call with its setup stays
# under the device's 10-minute limit; `tests` runs them one after another.
declare -A CHUNKS=(
  [tests_kernels]="tests/kernels tests/bench tests/test_packaging.py"
  [tests_model]="tests/engine/model tests/engine/inference"
  [tests_engine]="tests/engine --ignore=tests/engine/model --ignore=tests/engine/inference"
)
CHUNK_S=${GPU_CHUNK_S:-510}  # GPU_CHUNK_S: a shorter limit (to try the cut path)
EXTENSION=kernels/_C.cpython-312-x86_64-linux-gnu.so  # the image's Python 3.12

# The first visit (at most 45 minutes of device time; 40 planned): one device call per line, each
# `minutes|stages|carry`. Call 1 builds the extension; the later calls carry it from call 1's bundle.
PLAN=(
  "8|build smoke moe_decode|"
  "9|tests_kernels|$EXTENSION"
  "9|tests_model|$EXTENSION"
  "9|tests_engine|$EXTENSION"
)

print_plan() {
  local i=0 total=0 minutes stages carry
  echo "Each call: the device tool's run with command \"bash bench/gpu.sh --bundle \$OUT/visitN STAGES\""
  echo "(N the call's number) and carry as listed; it returns \$OUT/visitN.tar.gz. Before call 2:"
  echo "  tar xzf FILES_AT/visit1.tar.gz -C /tmp visit1/$(basename "$EXTENSION") && cp /tmp/visit1/$(basename "$EXTENSION") $EXTENSION"
  echo "(the extension is a git-ignored build output: carry sends it along to a fresh machine)."
  for entry in "${PLAN[@]}"; do
    IFS='|' read -r minutes stages carry <<< "$entry"
    i=$((i + 1))
    total=$((total + minutes))
    printf 'call %d (%d min): bash bench/gpu.sh --bundle $OUT/visit%d %s; carry: %s\n' \
      "$i" "$minutes" "$i" "$stages" "${carry:-none}"
  done
  echo "plan: $i calls, $total minutes"
}

if [ "${1:-}" = plan ]; then
  print_plan
  exit 0
fi
bundle=0
if [ "${1:-}" = --bundle ]; then
  bundle=1
  shift
fi
out=${1:?usage: bench/gpu.sh plan | bench/gpu.sh [--bundle] OUTDIR [stage ...]}
shift
stages=${*:-$ALL_STAGES}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cd "$repo"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
status=0
# The import names fusedrl.kernels / fusedrl.engine need the install (package_dir mapping); the
# extension is built by the `build` stage, not here.
FUSEDRL_SKIP_CUDA_BUILD=1 python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { echo "pip install -e . failed:"; tail -n 20 "$out/install.log"; exit 1; }
if compgen -G ".whl/*.whl" > /dev/null; then
  python -m pip install -q --no-index --no-deps --no-compile --target /tmp/fusedrl-peers .whl/*.whl \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/fusedrl-peers" || status=1
fi

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

build_extension() {
  local arch
  arch=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  if FUSEDRL_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" timeout 200 \
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
# is there, stopped by SIGINT at CHUNK_S (pytest then reports what ran) and killed 20 s later; its
# last line comes from bench/pytest_tally.py's per-test record, so a cut chunk still ends in
# "NAME: N passed, N failed, N skipped, N errors in S s[, cut by its timeout]".
run_chunk() {
  local name=$1 parallel=() start code
  if python -c "import xdist" 2> /dev/null; then
    parallel=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
  fi
  echo "== $name =="
  rm -f "$out/$name.tally"
  start=$SECONDS
  # shellcheck disable=SC2086  # the chunk's paths and --ignore options split on spaces
  FUSEDRL_TALLY="$out/$name.tally" PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" \
    timeout -k 20 -s INT "$CHUNK_S" python -m pytest ${CHUNKS[$name]} -q -p no:cacheprovider -p pytest_tally \
    "${parallel[@]}" --durations=15 --junitxml="$out/$name.xml" > "$out/$name.log" 2>&1
  code=$?
  tail -n 40 "$out/$name.log"
  [ "$code" -eq 0 ] || status=1
  python bench/pytest_tally.py "$out/$name.tally" "$name" "$((SECONDS - start))" "$code" | tee -a "$out/$name.log"
}

for stage in $stages; do
  case $stage in
    build)    echo "== CUDA extension (fusedrl.kernels._C) =="; build_extension ;;
    tests)    for chunk in tests_kernels tests_model tests_engine; do run_chunk "$chunk"; done ;;
    tests_kernels|tests_model|tests_engine) run_chunk "$stage" ;;
    # NCCL on one GPU: a 1-rank cpu:gloo,cuda:nccl group through tensor parallelism (decode graphs
    # capturing the collectives), expert parallelism's all_to_all, FSDP2 CPU offload + FusedAdamW.
    smoke)    run smoke 240 python -m torch.distributed.run --standalone --nproc-per-node 1 bench/smoke_nccl.py ;;
    # bf16 decode of a 2-layer Qwen3-30B-A3B-shaped MoE model (128 experts, top-8) at batch 1/32/128.
    moe_decode) run bench_moe_decode 240 python bench/bench_moe_decode.py --out "$out/bench_moe_decode.json" ;;
    kernels)  run bench_kernels 300 python bench/bench_kernels.py --ops token_logprobs,linear_token_logprobs \
                --json "$out/bench_kernels.json" ;;
    # linear_token_logprobs' fused GEMMs per tile shape against cuBLAS's GEMM of the same FLOPs, at
    # the bar's shape: sets linear_logprobs.fused_tiles.
    linear_tune) run tune_linear_logprobs 300 python bench/tune_linear_logprobs.py \
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
    ppo)      run bench_ppo 420 python bench/bench_ppo.py --out "$out/bench_ppo.json" ;;
    # Ours alone, each minibatch's 32 rows (128 + 256 tokens) packed into one forward by
    # ppo.tokens_per_microbatch instead of 16-row micro-batches: compare with stage ppo's ours.
    ppo_tokens) run bench_ppo_tokens 300 python bench/bench_ppo.py --sides ours --tokens-per-microbatch 12288 \
                  --out "$out/bench_ppo_tokens.json" ;;
    # PPO with rank-16 LoRA vs full fine-tuning at the same batch (bar: peak <= 0.6x, no slower), then
    # against TRL with PEFT (needs peft among the carried wheels: bench/peer_wheels.sh).
    ppo_lora) run bench_ppo_lora 570 python bench/bench_ppo.py --lora 16 --sides ours ours_lora \
                --out "$out/bench_ppo_lora.json" ;;
    ppo_lora_trl) run bench_ppo_lora_trl 570 python bench/bench_ppo.py --lora 16 --sides ours_lora trl_lora \
                --out "$out/bench_ppo_lora_trl.json" ;;
    # One GRPO iteration (16 prompts x 8 samples, verifiable reward) against TRL's GRPOTrainer.
    grpo)     run bench_grpo 420 python bench/bench_ppo.py --algo grpo --out "$out/bench_grpo.json" ;;
    # `fusedrl demo` (bf16-mixed on CUDA) for seeds 0, 1, 2: each prints its gain over SFT and wall time
    # (bars: >= +25 points for each seed, <= 20 s for seed 0); results in OUTDIR/demo_seedS/results.json.
    demo)     run demo 570 bash -c 'for s in 0 1 2; do fusedrl demo seed=$s output_dir="$1/demo_seed$s" \
                overwrite=true --quiet || exit 1; done' _ "$out" ;;
    # Bytes of one decode step on the GPU's (fused) paths: divide by bench_generate's step time.
    traffic)  run traffic 300 python bench/traffic.py --json "$out/traffic.json" --table "$out/traffic.md" ;;
    *) echo "unknown stage $stage (expected one of: $ALL_STAGES ${!CHUNKS[*]})"; status=1 ;;
  esac
done
if [ "$bundle" = 1 ]; then
  # The device returns at most 8 files: the whole OUTDIR as one archive.
  tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out" || status=1
  echo "bundled: $out.tar.gz"
fi
exit $status

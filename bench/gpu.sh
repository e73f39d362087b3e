#!/usr/bin/env bash
# The one command a GPU session runs: the CUDA extension built in place (fusedrl.kernels._C, for this
# GPU's arch only, to keep the build short), the test suite on the GPU (no interpreter; the cuda
# backend's tests run when the build succeeded), then the benchmarks, with logs and JSON (device,
# versions, git commit inside) written to OUTDIR. The GPU machine has torch, triton, nvcc, ninja,
# transformers and pytest but no network; the package is installed editable from this checkout
# (no dependencies fetched, no build isolation: the image has them). The peers it lacks
# (trl for bench_ppo.py) come as wheels in .whl/, fetched beforehand by bench/peer_wheels.sh and
# carried with the call; they are installed into a private folder, never over the image's packages.
#
#   bash bench/gpu.sh OUTDIR                    # every stage
#   bash bench/gpu.sh OUTDIR tests kernels      # some stages (to split a run across 10-minute calls)
# Stages: build tests kernels linear_tune rl_ops attention generate generate_unfused generate_qwen3 sampler exact sft train_step ppo ppo_tokens ppo_lora ppo_lora_trl grpo demo traffic (a later call can skip build: kernels/_C*.so stays
# in the checkout only on the same machine). Then copy what is worth keeping into bench/results/.
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUTDIR [stage ...]}
shift
stages=${*:-build tests kernels linear_tune rl_ops attention generate generate_unfused generate_qwen3 sampler exact sft train_step ppo ppo_tokens ppo_lora ppo_lora_trl grpo demo traffic}
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
    python -c "from fusedrl.kernels import cuda_ext; cuda_ext.require(); print('fusedrl.kernels._C loads')" \
      2>&1 | tee -a "$out/build_ext.log" || status=1
  else
    status=1
    echo "build failed (the cuda backend's tests will be skipped); end of $out/build_ext.log:"
    tail -n 30 "$out/build_ext.log"
  fi
}

# The suite on the GPU (no interpreter), spread over the cores with pytest-xdist when it is there
# (~5 min with 12 workers on a 16-core host; each stage must fit a 10-minute call), then one line:
# "tests: N passed, N failed, N skipped, N errors in S s".
run_tests() {
  local parallel=()
  if python -c "import xdist" 2> /dev/null; then
    parallel=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
  fi
  run tests 560 python -m pytest tests -q -p no:cacheprovider "${parallel[@]}" --durations=25 \
    --junitxml="$out/tests.xml"
  python - "$out/tests.xml" <<'PY' || status=1
import sys, xml.etree.ElementTree as ET
try:
    suite = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError) as error:
    sys.exit(f"tests: no report ({error})")
suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
print(f"tests: {passed} passed, {n['failures']} failed, {n['skipped']} skipped, {n['errors']} errors "
      f"in {float(suite.get('time', 0)):.0f} s")
PY
}

for stage in $stages; do
  case $stage in
    build)    echo "== CUDA extension (fusedrl.kernels._C) =="; build_extension ;;
    tests)    run_tests ;;
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
    *) echo "unknown stage $stage (build tests kernels linear_tune rl_ops attention generate generate_unfused generate_qwen3 sampler exact sft train_step ppo ppo_tokens ppo_lora ppo_lora_trl grpo demo traffic)"; status=1 ;;
  esac
done
exit $status

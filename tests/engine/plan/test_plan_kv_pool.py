"""The KV pool sized to the GPU (engine/plan/kv_pool.py): rollout.kv_cache_memory as bytes, a
fraction of the GPU or auto, planned for config.json-only Qwen2.5-7B GRPO with 16k-token answers on
8 x 80 GB, and the same rules at start-up (the free-memory check, the CPU's default)."""
import pytest
import torch

from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.ppo import GRPOConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.inference.llm import CPU_DEFAULT_KV_BYTES
from fusedrl.engine.plan.kv_pool import AUTO_HEADROOM, PoolFigures, fit_to_free
from fusedrl.engine.plan.planner import rollout_kv_bytes
from fusedrl.engine.plan.report import format_plan, to_json

from test_plan_qwen import CKPT, GB, plan, qwen  # noqa: F401 (the fixture)

# 16k-token answers; the token budgets of one forward (auto) grow to one 256 + 16384-token row.
LONG = ("rollout.max_new_tokens=16384", CKPT)
QWEN7B_KV_PER_TOKEN = 2 * 28 * 4 * 128 * 2  # K and V, 28 layers, 4 kv heads of 128, bf16: 57 KiB


def test_a_256_mib_pool_does_not_fit_a_16k_answer(qwen):
    result = plan("grpo", qwen["7B"], *LONG, "rollout.kv_cache_memory=268435456", advise=True)
    pool = result.kv_pool
    assert pool.tokens == 268435456 // QWEN7B_KV_PER_TOKEN // 16 * 16 and pool.sequences == 0
    assert result.peak < 80 * GB and not result.fits
    text = format_plan(result, "fusedrl plan grpo")
    assert "does NOT fit" in text
    assert "does not hold one full-length sequence of 16640 tokens" in text
    assert "raise rollout.kv_cache_memory" in text


def test_the_auto_pool_fits_at_least_8_full_length_sequences(qwen):
    result = plan("grpo", qwen["7B"], *LONG)
    pool = result.kv_pool
    assert result.fits and pool.sequences >= 8 and pool.sequence_tokens == 16640
    assert pool.tokens == pool.bytes // QWEN7B_KV_PER_TOKEN
    # The largest pool beside the fullest phase that holds it: that phase reaches 90% of the GPU.
    assert (1 - AUTO_HEADROOM) * 80 * GB - result.peak < QWEN7B_KV_PER_TOKEN * 16
    for phase in ("rollout", "scoring", "update", "export"):
        assert result.phases[phase]["kv_pool"] == pool.bytes
    text = format_plan(result, "plan")
    assert f"{pool.sequences} full-length sequences (16640 tokens) at once" in text
    assert to_json(result)["kv_pool"]["sequences"] == pool.sequences
    # Freed outside the rollout (torchrun: no CUDA graph holds it): the rollout alone bounds it.
    released = plan("grpo", qwen["7B"], *LONG, "rollout.release_kv_pool=true")
    assert released.kv_pool.bytes >= pool.bytes and released.phases["update"]["kv_pool"] == 0


def test_the_forward_budgets_default_to_one_full_length_row(qwen):
    """auto: a scoring forward and an update micro-batch hold 16384 tokens or one longer row; the
    update's micro-batches go by tokens only where minibatch_size full rows pass 16384."""
    long = grpo(max_new_tokens=16384)
    assert long.rollout.tokens_per_forward == "auto" == long.ppo.tokens_per_microbatch
    assert long.rollout.forward_tokens == 16640 == long.microbatch_tokens
    short = grpo()  # 16 rows of 256 + 64 tokens: 5120, the minibatch in one forward as before
    assert short.rollout.forward_tokens == 16384 and short.microbatch_tokens is None
    assert grpo(max_new_tokens=16384, tokens_per_forward=None).rollout.forward_tokens is None
    rows = config_io.from_dict(GRPOConfig, {**_REQUIRED, "rollout": {"max_new_tokens": 16384},
                                            "ppo": {"microbatch_size": 2}})
    assert rows.microbatch_tokens is None  # a microbatch_size set: micro-batches by rows
    for bad in ("lots", 16000):
        with pytest.raises(ValueError, match="rollout.tokens_per_forward=.* must hold one row"):
            grpo(max_new_tokens=16384, tokens_per_forward=bad)
    # A 16384-token budget does not hold a 16k row: it is refused, auto plans one row.
    with pytest.raises(UsageError, match="ppo.tokens_per_microbatch=16384 must hold one row"):
        plan("grpo", qwen["7B"], *LONG, "ppo.tokens_per_microbatch=16384")
    update = plan("grpo", qwen["7B"], *LONG).phases["update"]["activations"]
    assert update == plan("grpo", qwen["7B"], *LONG, "ppo.tokens_per_microbatch=16640").phases["update"]["activations"]


def test_a_fraction_of_the_gpu_and_the_engine_cap(qwen):
    quarter = plan("grpo", qwen["7B"], *LONG, "rollout.kv_cache_memory=0.25").kv_pool
    assert 20 * GB - QWEN7B_KV_PER_TOKEN * 16 < quarter.bytes <= 20 * GB
    # Never more than prompts x samples sequences of max_model_len (32768 tokens) tokens.
    capped = plan("grpo", qwen["7B"], "rollout.prompts_per_iteration=1",
                  "rollout.samples_per_prompt=2", "rollout.kv_cache_memory=1.0").kv_pool
    assert capped.tokens == 2 * 32768


def test_a_pool_below_one_group_warns(qwen):
    four = 4 * 16640 * QWEN7B_KV_PER_TOKEN
    result = plan("grpo", qwen["7B"], *LONG, f"rollout.kv_cache_memory={four}")
    assert result.fits and result.kv_pool.sequences == 4
    assert "fewer than one group (rollout.samples_per_prompt=8)" in result.notes[0]


def test_the_free_memory_check_shrinks_the_pool_or_refuses():
    pool = PoolFigures(bytes=100 * 1024 * 10, tokens=100 * 10, sequences=10, sequence_tokens=100,
                       group=4)
    assert fit_to_free(pool, planned_peak=50 * GB, capacity=60 * GB) == pool.bytes
    assert fit_to_free(pool, planned_peak=50 * GB, capacity=50 * GB - 1024 * 300) == 1024 * 700
    with pytest.raises(UsageError, match="does not hold one full-length sequence of 100 tokens"):
        fit_to_free(pool, planned_peak=50 * GB, capacity=50 * GB - 1024 * 950)


_REQUIRED = {"policy": "p", "prompts_file": "f", "output_dir": "o", "reward_fn": "m:f"}


def grpo(**rollout):
    return config_io.from_dict(GRPOConfig, {**_REQUIRED, "rollout": rollout})


def test_kv_cache_memory_values():
    assert grpo().rollout.kv_cache_memory == "auto"
    assert grpo(kv_cache_memory=1 << 20).rollout.kv_cache_memory == 1 << 20
    assert grpo(kv_cache_memory=0.5).rollout.kv_cache_memory == 0.5
    assert grpo(kv_cache_memory="8.0e9").rollout.kv_cache_memory == 8 * 10**9
    for bad in ("lots", 0, 1.5, -3):
        with pytest.raises(ValueError, match=f"rollout.kv_cache_memory.*got {bad!r}"):
            grpo(kv_cache_memory=bad)
    cpu = torch.device("cpu")
    assert rollout_kv_bytes(grpo(), cpu, 1, 1) == CPU_DEFAULT_KV_BYTES
    assert rollout_kv_bytes(grpo(kv_cache_memory=4096), cpu, 1, 1) == 4096
    with pytest.raises(UsageError, match="is a fraction of the GPU's memory: the run is on cpu"):
        rollout_kv_bytes(grpo(kv_cache_memory=0.5), cpu, 1, 1)

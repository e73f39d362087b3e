"""rollout.exact: short PPO and GRPO runs whose every iteration reports a sampler / training-forward
log-prob mismatch of exactly 0, with the importance-sampling correction on (its weights are all 1)."""
import pytest

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, PPOConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, torchrun
from invariant_testing import one_thread  # noqa: F401 (autouse fixture)
from train_testing import save_tiny_model, write_jsonl
from reward_testing import vowel_fraction


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_exact")
    policy_dir = save_tiny_model(root / "policy", arch="qwen2")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in
                                                   ["the quick brown", "hello world", "lazy dog", "fox jumps over"]])
    return root, policy_dir, prompts


def train_rows(root, name):
    return [r for r in read_metrics(root / name) if r["kind"] == "train"]


def assert_exact(rows, iterations):
    assert len(rows) == iterations
    for r in rows:
        assert (r["logprob_mismatch"], r["logprob_mismatch_max"], r["logprob_mismatch_tokens"]) == (0, 0, 0), r
        assert r["is_weight_mean"] == 1 and r["is_weight_max"] == 1, r  # the IS correction is the identity


@pytest.mark.parametrize("is_mode", ["tis", "mis"])
def test_ppo_with_exact_rollouts_reports_zero_mismatch_every_iteration(setup, is_mode):
    root, policy_dir, prompts = setup
    name = f"ppo-{is_mode}"
    cfg = PPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / name), critic="shared",
                    rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                          temperature=0.8, top_p=0.9, kv_cache_memory=1 << 22, block_size=4,
                                          exact=True),
                    ppo=UpdateConfig(epochs=2, minibatch_size=3, is_mode=is_mode),
                    train=LoopConfig(iterations=2, progress=False, device="cpu"))   # the second after an update
    train_ppo(cfg, reward_fn=vowel_fraction)
    rows = train_rows(root, name)
    assert_exact(rows, 2)
    assert rows[0]["approx_kl"] != rows[-1]["approx_kl"] or rows[0]["kl"] != rows[-1]["kl"]  # it trained


def test_grpo_with_exact_rollouts_reports_zero_mismatch_every_iteration(setup):
    root, policy_dir, prompts = setup
    cfg = GRPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / "grpo"),
                     rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=4, max_new_tokens=6,
                                           kv_cache_memory=1 << 22, block_size=8, exact=True),
                     ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=4, vf_coef=0.0, kl_loss_coef=0.01,
                                      is_mode="tis"),
                     train=LoopConfig(iterations=2, progress=False, device="cpu"))
    train_ppo(cfg, reward_fn=vowel_fraction)
    assert_exact(train_rows(root, "grpo"), 2)


def test_lora_with_exact_rollouts_reports_zero_mismatch_every_iteration(setup):
    """The adapters' GEMMs run through the mode's fixed-tile linear: still exact once they trained."""
    root, policy_dir, prompts = setup
    cfg = PPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / "lora"), critic="shared",
                    lora=LoRAConfig(rank=4, alpha=8.0),
                    rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                          kv_cache_memory=1 << 22, block_size=4, exact=True),
                    ppo=UpdateConfig(epochs=1, minibatch_size=6, is_mode="tis"), optim=OptimConfig(lr=1e-2),
                    train=LoopConfig(iterations=2, progress=False, device="cpu"))
    train_ppo(cfg, reward_fn=vowel_fraction)
    rows = train_rows(root, "lora")
    assert_exact(rows, 2)
    assert rows[1]["kl"] != 0  # the adapters trained, so the second iteration's policy is adapted


def test_exact_rollouts_under_two_ranks(setup):
    """torchrun, 2 CPU ranks, FSDP2: each rank's sampler and (gathered-weight) old forward agree to the bit."""
    root, policy_dir, prompts = setup
    cfg = PPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / "ranks"),
                    reward_fn="reward_testing:vowel_fraction", critic="shared",
                    rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=6,
                                          kv_cache_memory=1 << 22, block_size=4, exact=True),
                    ppo=UpdateConfig(epochs=1, minibatch_size=2, is_mode="tis"),
                    train=LoopConfig(iterations=2, progress=False, device="cpu"))
    check(torchrun("ppo", cfg, root))
    assert_exact(train_rows(root, "ranks"), 2)


def test_default_rollouts_are_not_exact(setup):
    """Without the mode the two sides run different kernels: close, not equal (what the mode fixes)."""
    root, policy_dir, prompts = setup
    cfg = PPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / "default"),
                    critic="shared", rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3,
                                                           max_new_tokens=6, kv_cache_memory=1 << 22),
                    ppo=UpdateConfig(epochs=1, minibatch_size=3), train=LoopConfig(iterations=1, progress=False,
                                                                                   device="cpu"))
    train_ppo(cfg, reward_fn=vowel_fraction)
    (row,) = train_rows(root, "default")
    assert 0 < row["logprob_mismatch_max"] < 1e-4 and row["logprob_mismatch_tokens"] > 0

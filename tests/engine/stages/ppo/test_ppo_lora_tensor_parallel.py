"""PPO with LoRA at train.tensor_parallel=2 (gloo CPU ranks, engine/model/lora.py): lora.rank on the
policy and critic_lora.rank on the reward model's own decoder, the adapters sliced like the weights
they adapt, the reference the policy with its adapters off, the tensor group rolling out in lockstep
(test_ppo_tensor_parallel.py's config with adapters). It equals one process's adapters, merged models
and metrics. GRPO with lora.rank runs the same LoRA code (its own parts are tested without adapters
there); one launch here keeps the suite's time.
"""
import pytest

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.stages.ppo.trainer import train_ppo
from dist_testing import check, rank_threads, torchrun
from test_ppo_tensor_parallel import max_relative_diff, ppo_config, save_policy_and_reward_model, train_metrics
from train_testing import write_jsonl

LORA = LoRAConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj,o_proj,up_proj,down_proj")


def with_lora(cfg):
    """cfg with adapters on the policy and the critic, Adam's eps 1e-3: B starts at 0, so an element
    whose gradient is the rounding of the slices' sum alone would take steps of order lr against a
    max |B| of only ~lr x steps; eps 1e-3 bounds its move by 1e-2 x that rounding (the error model
    of tests/engine/train/test_context_parallel_training.py)."""
    cfg.lora = cfg.critic_lora = LORA
    cfg.optim = OptimConfig(lr=1e-3, eps=1e-3)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_lora_tp")
    save_policy_and_reward_model(root)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog"]])
    check(torchrun("ppo", with_lora(ppo_config(root, "t2", 2)), root))
    with rank_threads():
        train_ppo(with_lora(ppo_config(root, "one")))
    return root


def test_ppo_with_lora_and_critic_lora_at_two_tensor_ranks_trains_one_process_s_adapters(runs):
    for final in ("final", "final_critic"):  # the bar, on the merged models
        assert max_relative_diff(runs / "one" / final, runs / "t2" / final) <= 1e-4, final
    # The adapters against their own max (5e-5 and 2e-5 measured; GRPO's 2.6e-4): B starts at 0 and
    # Adam moves it ~lr a step whatever its gradient, so max |B| is only ~lr x steps, and an element
    # whose gradient is a sum cancelling to near 0 moves by lr x its rounding / its size. A wrong
    # slice or a missed reduction moves B by ~lr: 1e-1 of its max.
    for adapter in ("final_adapter", "final_critic_adapter"):
        assert max_relative_diff(runs / "one" / adapter, runs / "t2" / adapter, WEIGHTS_FILE) <= 1e-3, adapter
    for key in ("loss", "score_mean", "kl", "value_loss", "explained_variance"):
        assert train_metrics(runs / "t2", key) == pytest.approx(train_metrics(runs / "one", key),
                                                                rel=1e-4, abs=2e-5), key

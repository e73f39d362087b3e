"""GRPO and PPO with LoRA at train.tensor_parallel=2 (gloo CPU ranks, engine/model/lora.py): the
adapters sliced like the weights they adapt, the reference the policy with its adapters off, the
tensor group rolling out in lockstep; the configs of test_ppo_tensor_parallel.py with adapters. GRPO
with lora.rank, and PPO with lora.rank on the policy and critic_lora.rank on the reward model's own
decoder, each equal one process's adapters and metrics."""
import os

import pytest
from safetensors.torch import load_file

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.stages.ppo.trainer import run_ppo
from dist_testing import check, rank_threads, torchrun
from test_ppo_tensor_parallel import grpo_config, ppo_config, records, save_policy_and_reward_model, train_metrics
from train_testing import write_jsonl

LORA = LoRAConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj,o_proj,up_proj,down_proj")


def with_lora(cfg, critic=False):
    cfg.lora = LORA
    if critic:
        cfg.critic_lora = LORA
    return cfg


def max_relative_diff(dir_a, dir_b, file) -> float:
    """max |a - b| / max |a| over every tensor of `file` in two directories."""
    a, b = load_file(dir_a / file), load_file(dir_b / file)
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a)


def check_equal_runs(one, two, finals, adapters):
    """The merged models within the issue's bar (1e-4 of max |w|; 2e-7 measured). The adapters
    within 1e-3 of their own max: B starts at 0 and Adam moves it ~lr a step whatever its gradient,
    so max |B| is only ~lr x steps, while the KL's gradient carries the rounding of log-probs ~5
    apart from each other by ~1e-2 (the second iteration's kl_loss agrees to 6e-5): 2.6e-4 of
    max |B| measured. A wrong slice or a missed reduction moves B by ~lr, 1e-1 of its max."""
    for final in finals:
        assert max_relative_diff(one / final, two / final, "model.safetensors") <= 1e-4, final
    for adapter in adapters:
        assert max_relative_diff(one / adapter, two / adapter, WEIGHTS_FILE) <= 1e-3, adapter


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_lora_tp")
    save_policy_and_reward_model(root)
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog",
                                                                  "fox jumps", "over the", "brown fox"]])
    for name in ("grpo_one", "grpo_t2"):
        (root / f"rec-{name}").mkdir()
    check(torchrun("grpo", with_lora(grpo_config(root, "grpo_t2", 1, 2)), root,
                   env={"RECORD_DIR": str(root / "rec-grpo_t2")}))
    check(torchrun("ppo", with_lora(ppo_config(root, "ppo_t2", 2), critic=True), root))
    os.environ["RECORD_DIR"] = str(root / "rec-grpo_one")
    try:
        with rank_threads():
            run_ppo(with_lora(grpo_config(root, "grpo_one")))
            run_ppo(with_lora(ppo_config(root, "ppo_one"), critic=True))
    finally:
        del os.environ["RECORD_DIR"]
    return root


def test_grpo_with_lora_at_two_tensor_ranks_trains_one_process_s_adapters(runs):
    """Both iterations sample one process's tokens (the second through trained adapters)."""
    one = records(runs / "rec-grpo_one", 0)
    assert len(one) == 2 * 12 and records(runs / "rec-grpo_t2", 0) == one and records(runs / "rec-grpo_t2", 1) == []
    check_equal_runs(runs / "grpo_one", runs / "grpo_t2", ["final"], ["final_adapter"])
    for key in ("loss", "kl_loss", "score_mean", "grad_norm"):
        assert train_metrics(runs / "grpo_t2", key) == pytest.approx(train_metrics(runs / "grpo_one", key),
                                                                     rel=1e-4, abs=2e-5), key


def test_ppo_with_lora_and_critic_lora_at_two_tensor_ranks_trains_one_process_s_adapters(runs):
    check_equal_runs(runs / "ppo_one", runs / "ppo_t2", ["final", "final_critic"],
                     ["final_adapter", "final_critic_adapter"])
    for key in ("loss", "score_mean", "kl", "value_loss", "explained_variance"):
        assert train_metrics(runs / "ppo_t2", key) == pytest.approx(train_metrics(runs / "ppo_one", key),
                                                                    rel=1e-4, abs=2e-5), key

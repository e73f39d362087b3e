"""Turn-level credit (reward.per_turn, stages/rollout/turn_credit.py): an environment's reward of each turn
sits at that turn's last model token of the rollout PPO's GAE and critic learn from, and with
ppo.turn_advantages a group's turns are the units of its advantages."""
import datasets
import pytest
import torch

import fusedrl.kernels as kernels
from fusedrl.engine import GRPOConfig, PPOConfig, run_grpo, run_ppo
from fusedrl.engine.stages.ppo import trainer
from fusedrl.engine.stages.rollout.turn_credit import (per_turn, place_turn_rewards, turn_returns,
                                             turn_spans, turn_token_advantages)
from agent_testing import save_chat_model

ROWS = [{"prompt": "hello world"}, {"prompt": "the brown dog"}]


@pytest.fixture(autouse=True)
def torch_kernels():
    with kernels.use_backend("torch"):  # the engine's wiring is under test, not the kernels
        yield


def test_turns_are_the_runs_of_model_tokens():
    mask = [True, True, False, False, True, False, True, True, True]
    assert turn_spans(mask, len(mask)) == [(0, 2), (4, 5), (6, 9)]
    assert turn_spans(None, 4) == [(0, 4)]  # a single-turn answer is one turn
    assert per_turn([0.5], 3) == [0.5, 0.0, 0.0]  # the last turns no step answered earn 0
    assert turn_returns([0.0, 0.0, 1.0], 0.5) == [0.25, 0.5, 1.0]
    rewards = place_turn_rewards(torch.zeros(1, 9), [turn_spans(mask, 9)], [[1.0, 2.0, 3.0]])
    assert rewards[0].tolist() == [0, 1, 0, 0, 2, 0, 0, 0, 3]


def test_turn_advantages_pool_every_turn_of_a_group():
    spans = [[(0, 2), (3, 4)], [(0, 3)]]
    returns = [[1.0, 3.0], [2.0]]  # one group of two rows: pooled mean 2, std 1
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    grpo = turn_token_advantages(returns, spans, mask, 2, "grpo")
    torch.testing.assert_close(grpo, torch.tensor([[-1.0, -1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="estimator 'rloo'"):
        turn_token_advantages(returns, spans, mask, 2, "rloo")


def test_turn_credit_reaches_the_device_without_waiting_for_it():
    """The rewards' places and the advantages are built on the host and sent in copies the stream
    does not wait for: no `torch.tensor(..., device=)`, no blocking `.to(device)`, no host read."""
    from host_cost import HostCounter
    spans = [[(0, 2), (3, 4)], [(0, 3)]]
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)
    with HostCounter() as counter:
        rewards = place_turn_rewards(torch.zeros(2, 4), spans, [[0.5, 1.5], [2.0]])
        turn_token_advantages([[1.0, 3.0], [2.0]], spans, mask, 2, "grpo")
    assert not counter.copies and not counter.syncs, (counter.copies, dict(counter.syncs))
    assert rewards.tolist() == [[0.0, 0.5, 0.0, 1.5], [0.0, 0.0, 2.0, 0.0]]


def turn_runs(mask_row: torch.Tensor) -> list[tuple[int, int]]:
    """The turns of a rollout row, read from its mask alone (the model's tokens)."""
    return turn_spans(mask_row.tolist(), mask_row.numel())


def trained_rollouts(monkeypatch, run, config: dict) -> list:
    """The rollouts the update learns from, in a run of `config` on three-turn trajectories."""
    seen = []
    update = trainer.ppo_update

    def recording(models, opts, rollout, *args, **kwargs):
        seen.append(rollout)
        return update(models, opts, rollout, *args, **kwargs)
    monkeypatch.setattr(trainer, "ppo_update", recording)
    run(config, dataset=datasets.Dataset.from_list(ROWS))
    return seen


def config(tmp_path, environment: str, **options) -> dict:
    model = save_chat_model(tmp_path / "chat")
    return {"policy": str(model), "output_dir": str(tmp_path / "run"), **options,
            "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 4,
                        "kv_cache_memory": 1 << 22, "max_prompt_length": 40,
                        "environment": environment, "max_turns": 3},
            "ppo": {"minibatch_size": 4, "epochs": 1, **options.pop("ppo", {})},
            "train": {"iterations": 1, "progress": False, "device": "cpu"}}


@pytest.mark.parametrize("per_turn", [True, False])
def test_each_turn_s_reward_sits_at_its_last_model_token_for_gae(tmp_path, monkeypatch, per_turn):
    """PPO (GAE, shared critic) on trajectories whose turn k earns k / 10: with reward.per_turn
    the rewards GAE reads are 0.1, 0.2, 0.3 at the three turns' last model tokens; without, their
    sum at the trajectory's last token."""
    cfg = config(tmp_path, "turn_testing:EveryTurnPays", critic="shared",
                 reward={"per_turn": per_turn, "kl_coef": 0.0})
    [rollout] = trained_rollouts(monkeypatch, run_ppo, cfg)
    for rewards, mask in zip(rollout.rewards, rollout.mask):
        runs = turn_runs(mask)
        assert len(runs) == 3  # each turn cut at 4 tokens is still answered
        ends = [end - 1 for _, end in runs]
        expected = torch.zeros_like(rewards)
        expected[ends] = torch.tensor([0.1, 0.2, 0.3]) if per_turn else torch.tensor([0, 0, 0.6])
        torch.testing.assert_close(rewards, expected)


def test_the_last_turn_s_reward_credits_the_earlier_turns_by_turn_gamma(tmp_path, monkeypatch):
    """GRPO with ppo.turn_advantages on trajectories whose third turn alone earns: the reward sits
    at the third turn's last token, and each turn's tokens share one advantage, growing with the
    turn's discounted return (0.25, 0.5, 1)."""
    cfg = config(tmp_path, "turn_testing:LastTurnPays", reward={"per_turn": True, "turn_gamma": 0.5},
                 ppo={"turn_advantages": True})
    [rollout] = trained_rollouts(monkeypatch, run_grpo, cfg)
    for rewards, advantages, mask in zip(rollout.rewards, rollout.advantages, rollout.mask):
        runs = turn_runs(mask)
        assert len(runs) == 3
        assert rewards.nonzero().flatten().tolist() == [runs[2][1] - 1]
        assert rewards[runs[2][1] - 1].item() == pytest.approx(1.0)
        per_turn_values = [advantages[start:end].unique() for start, end in runs]
        assert all(v.numel() == 1 for v in per_turn_values)
        first, second, third = (v.item() for v in per_turn_values)
        assert first < second < third
        # every trajectory alike: its turns' returns pooled over the group are 0.25, 0.5, 1 each
        pooled = torch.tensor([0.25, 0.5, 1.0] * 2, dtype=torch.float64)
        assert third == pytest.approx(((1.0 - pooled.mean()) / (pooled.std() + 1e-6)).item(),
                                      rel=1e-5)

"""What an iteration carries to the next lives in the loop state: the KL controller and the reward
moments are restored from it and saved back; the jobs' settings are read from a PPOConfig once."""
import dataclasses

import torch

from fusedrl.engine.config.ppo import PPOConfig, RewardConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.stages.ppo.experience import ExperienceSettings
from fusedrl.engine.stages.ppo.controllers import Controllers
from fusedrl.engine.stages.rollout.state import PPOState
from fusedrl.engine.stages.ppo.update import UpdateSettings


def test_controllers_round_trip_through_the_loop_state():
    reward = RewardConfig(kl_coef=0.1, kl_target=1.0, kl_horizon=10)
    state = PPOState(kl_coef=reward.kl_coef)
    first = Controllers.restore(state, reward)
    assert first.kl.value == 0.1 and first.moments.count == 0
    first.moments.update(torch.tensor([1.0, 3.0]))
    first.kl.update(2.0, n_samples=5)          # KL above target: beta *= 1 + 0.2 * 5 / 10
    first.save(state)
    assert state.kl_coef == 0.1 * 1.1 and state.moments == {"count": 2, "mean": 2.0, "m2": 2.0}
    # The next iteration (or a resumed run, whose loop state came from a checkpoint) starts there.
    again = Controllers.restore(dataclasses.replace(state), reward)
    assert again.kl.value == state.kl_coef and again.kl.target == 1.0 and again.kl.horizon == 10
    assert (again.moments.count, again.moments.mean, again.moments.std) == (2, 2.0, 1.0)


def test_settings_take_the_fields_their_job_reads():
    cfg = PPOConfig(policy="p", prompts_file="f", output_dir="o", reward_fn="m:f",
                    rollout=RolloutConfig(max_new_tokens=24, temperature=0.7, exact=True),
                    reward=RewardConfig(kl_estimator="k3", normalize=True, clip=5.0),
                    ppo=UpdateConfig(estimator="reinforce", gamma=0.9, lam=0.8, whiten_advantages=False))
    assert ExperienceSettings.of(cfg) == ExperienceSettings(0.7, True, "k3", True, 5.0, "reinforce", 0.9, 0.8, False,
                                                            16384)  # tokens_per_forward=auto
    update = UpdateSettings.of(cfg)
    # tokens_per_microbatch=auto: 16 rows of 256 + 24 tokens go in one forward (by microbatch_size)
    assert (update.ppo, update.temperature, update.loss_agg_norm) == (
        dataclasses.replace(cfg.ppo, tokens_per_microbatch=None), 0.7, 24)  # the norm's default
    norm = dataclasses.replace(cfg, ppo=dataclasses.replace(cfg.ppo, loss_agg_norm=100.0))
    assert UpdateSettings.of(norm).loss_agg_norm == 100.0

"""The one rollout interface (stages/rollout/sampler.py): the config picks its rows and its schedule,
and every mode's metrics come out of the one Sampler (the schedule's, its rows' included,
speculative decoding's)."""
from types import SimpleNamespace

import pytest

from fusedrl.engine.config.ppo import GRPOConfig
from fusedrl.engine.parallel.distributed import WORLD
from fusedrl.engine.stages.rollout.agent_rows import TrajectoryGenerator
from fusedrl.engine.stages.rollout.partial import PartialRollouts
from fusedrl.engine.stages.rollout.sampler import Sampler, build_sampler
from fusedrl.engine.stages.rollout.whole_groups import WholeGroups
from fusedrl.engine.stages.rollout.answer_rows import AnswerGenerator
from fusedrl.engine.stages.rollout.state import PPOState


def config(**rollout):
    return GRPOConfig.from_dict({"policy": "p", "prompts_file": "f", "output_dir": "o",
                                 "reward_fn": "m:f", "rollout": rollout})


@pytest.mark.parametrize("rollout,agents,rows,schedule", [
    ({}, None, AnswerGenerator, WholeGroups),
    ({"dynamic_sampling": True}, None, AnswerGenerator, WholeGroups),
    ({"partial_rollouts": True, "speculative_tokens": 2}, None, None, PartialRollouts),
    ({"tools": ["agent_envs:add"], "dynamic_sampling": True}, "agents", TrajectoryGenerator,
     WholeGroups),
])
def test_the_config_picks_the_rows_and_the_schedule(rollout, agents, rows, schedule):
    cfg = config(**rollout)
    sampler = build_sampler(cfg, SimpleNamespace(ranks=WORLD), [], agents)
    assert type(sampler.schedule) is schedule
    if rows is not None:  # partial rollouts continue their rows in flight themselves
        assert type(sampler.schedule.rows) is rows
    assert sampler.speculative == bool(cfg.rollout.speculative_tokens)


class Schedule:
    def sample(self, state, seed, timer):
        return None, {"carried": seed}


def test_every_mode_s_metrics_come_out_of_the_one_sampler():
    spec = iter([{"drafted": 5, "accepted": 3}, {"drafted": 1, "accepted": 0}])
    actor = SimpleNamespace(take_speculation=lambda: next(spec))
    models = SimpleNamespace(ranks=WORLD, actor=actor)
    sampler = Sampler(models, Schedule(), speculative=True)
    assert sampler.sample(PPOState(), 7, None) == (
        None, {"carried": 7, "spec/drafted": 5, "spec/accepted": 3})
    assert sampler.sample(PPOState(), 8, None)[1] == {
        "carried": 8, "spec/drafted": 1, "spec/accepted": 0}
    quiet = Sampler(models, Schedule(), speculative=False)
    assert quiet.sample(PPOState(), 9, None)[1] == {"carried": 9}


def test_whole_groups_report_their_rows_metrics_of_every_round():
    class Rows:
        calls = 0

        def generate(self, batch, seed, timer):
            self.calls += 1
            return batch

        def take_metrics(self):
            return {"turns/mean": self.calls}
    cfg = config(prompts_per_iteration=1)
    schedule = WholeGroups(Rows(), lambda state, k: ["row"], lambda rows, timer: rows, cfg, WORLD)
    assert schedule.sample(PPOState(), 1, None) == (["row"], {"turns/mean": 1})

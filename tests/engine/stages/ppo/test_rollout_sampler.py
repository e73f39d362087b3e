"""The one rollout interface (stages/ppo/sampler.py): the config picks its rows and its schedule,
and every mode's metrics come out of the one Sampler (the rows', the schedule's, speculative
decoding's)."""
from types import SimpleNamespace

import pytest

from fusedrl.engine.config.ppo import GRPOConfig
from fusedrl.engine.parallel.distributed import WORLD
from fusedrl.engine.stages.ppo.agent_sampling import TrajectoryGenerator
from fusedrl.engine.stages.ppo.partial import PartialRollouts
from fusedrl.engine.stages.ppo.sampler import Sampler, WholeGroups, build_sampler
from fusedrl.engine.stages.ppo.sampling import AnswerGenerator
from fusedrl.engine.stages.ppo.state import PPOState


def config(**rollout):
    return GRPOConfig.from_dict({"policy": "p", "prompts_file": "f", "output_dir": "o",
                                 "reward_fn": "m:f", "rollout": rollout})


@pytest.mark.parametrize("rollout,agents,rows,schedule", [
    ({}, None, AnswerGenerator, WholeGroups),
    ({"dynamic_sampling": True}, None, AnswerGenerator, WholeGroups),
    ({"partial_rollouts": True, "speculative_tokens": 2}, None, AnswerGenerator, PartialRollouts),
    ({"tools": ["agent_envs:add"], "dynamic_sampling": True}, "agents", TrajectoryGenerator,
     WholeGroups),
])
def test_the_config_picks_the_rows_and_the_schedule(rollout, agents, rows, schedule):
    cfg = config(**rollout)
    sampler = build_sampler(cfg, SimpleNamespace(ranks=WORLD), [], agents)
    assert type(sampler.rows) is rows and type(sampler.schedule) is schedule
    assert sampler.speculative == bool(cfg.rollout.speculative_tokens)


class Rows:
    """Rows whose metrics count the calls since the last take."""
    def __init__(self):
        self.calls = 0

    def take_metrics(self):
        calls, self.calls = self.calls, 0
        return {"turns/mean": calls}


class Schedule:
    def __init__(self, rows):
        self.rows = rows

    def sample(self, state, seed, timer):
        self.rows.calls += 2  # two rounds
        return None, {"carried": seed}


def test_every_mode_s_metrics_come_out_of_the_one_sampler():
    spec = iter([{"drafted": 5, "accepted": 3}, {"drafted": 1, "accepted": 0}])
    llm = SimpleNamespace(take_speculation=lambda: next(spec))
    models = SimpleNamespace(ranks=WORLD, actor=SimpleNamespace(llm=llm))
    rows = Rows()
    sampler = Sampler(models, rows, Schedule(rows), speculative=True)
    assert sampler.sample(PPOState(), 7, None) == (
        None, {"carried": 7, "turns/mean": 2, "spec/drafted": 5, "spec/accepted": 3})
    assert sampler.sample(PPOState(), 8, None)[1] == {
        "carried": 8, "turns/mean": 2, "spec/drafted": 1, "spec/accepted": 0}
    quiet = Sampler(models, rows, Schedule(rows), speculative=False)
    assert quiet.sample(PPOState(), 9, None)[1] == {"carried": 9, "turns/mean": 2}

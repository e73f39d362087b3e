"""Whole groups of multi-turn trajectories (stages/rollout/agent_rows.py) run through the path
partial rollouts carry them on (engine/agents/carried.py): for a fixed seed they are the
trajectories the demos' run_agents samples (a thin wrapper over that path), token for token, with
the same model masks, log-prob bits, rewards, conversations and finish reasons, and environment
errors leave the same rows (the tokens LLM.generate_turns drew before the path was shared are
held by tests/engine/stages/seeded_record.json)."""
import types

import pytest
import torch

import fusedrl.kernels as kernels
from fusedrl.engine.agents import run_agents
from fusedrl.engine.config.ppo import RolloutConfig
from fusedrl.engine.data.prompts import PromptRow
from fusedrl.engine.inference.hybrid_actor import HybridActor
from fusedrl.engine.model.hf_io import load_model, load_tokenizer
from fusedrl.engine.stages.rollout.agent_rows import TrajectoryGenerator, build_agents
from fusedrl.engine.stages.rollout.phase_timer import PhaseTimer
from fusedrl.engine.stages.rollout.sampled_rows import sampling_params
from agent_testing import save_chat_model
from invariant_testing import one_thread  # noqa: F401 (autouse: one intra-op thread)

PROMPTS = ["hello world", "the brown dog", "a"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return save_chat_model(tmp_path_factory.mktemp("chat"))


@pytest.mark.parametrize("environment,columns,limits", [
    # two turns of three, under a cap that cuts most: 'length' and 'max_turns' ends
    ("agent_envs:ThreeTurns", [{"level": 1}, {"level": 2}, {"level": 3}],
     {"max_turns": 2, "max_trajectory_tokens": 60}),
    # one prompt's environments crash: its rows leave the batch (no target, no reward)
    ("agent_fault_envs:Hostile", [{"mode": "crash"}, {"mode": "ok"}, {"mode": "ok"}],
     {"max_turns": 2}),
])
def test_whole_groups_sample_what_run_agents_samples(chat_model, environment, columns,
                                                         limits):
    rollout = RolloutConfig(samples_per_prompt=3, max_new_tokens=6, temperature=1.0,
                            kv_cache_memory=1 << 22, environment=environment, **limits)
    tokenizer = load_tokenizer(chat_model)
    with kernels.use_backend("torch"):
        actor = HybridActor(load_model(chat_model, device="cpu"), tokenizer,
                            kv_cache_memory=1 << 22, use_cuda_graphs=False, device="cpu")
        agents = build_agents(rollout, tokenizer)
        sources = [PromptRow(tokenizer.encode(p), p, c) for p, c in zip(PROMPTS, columns)]
        generated = TrajectoryGenerator(types.SimpleNamespace(actor=actor), agents,
                                        rollout).generate(sources, 11, PhaseTimer(CPU))
        rows = [{"prompt": s.prompt, **s.columns} for s in sources]
        expected = run_agents(actor.llm, agents.renderer, agents.source, rows,
                              sampling_params(rollout, 11, rollout.samples_per_prompt),
                              agents.limits)
        expected_logprobs = actor.llm.device_logprobs(
            [s for t in expected if not t.error for s in t.tokens.logprob_slots])
    got = generated.trajectories
    assert generated.prompts == [t.tokens.prompt_token_ids for t in expected]
    assert generated.responses == [t.tokens.token_ids for t in expected]
    assert sum(map(len, generated.responses)) > 0
    assert [t.error for t in got] == [t.error for t in expected]
    assert generated.model_masks == [[False] * len(t.tokens.model_mask) if t.error
                                     else t.tokens.model_mask for t in expected]
    assert torch.equal(generated.sampler_logprobs, expected_logprobs)  # bit for bit
    assert generated.env_rewards == [[] if t.error else list(t.turn_rewards) for t in expected]
    assert [t.messages for t in got] == [t.messages for t in expected]
    assert ([(t.tokens.turns, t.tokens.finish_reason) for t in got]
            == [(t.tokens.turns, t.tokens.finish_reason) for t in expected])
    if environment.endswith("ThreeTurns"):
        assert {t.tokens.finish_reason for t in got} >= {"length"}
    else:
        assert [t.error for t in got] == ["error"] * 3 + [None] * 6

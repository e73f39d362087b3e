"""Multi-turn rollouts on a tiny model: a scripted environment over several turns with long
observations, an environment that raises and one that hangs (the others go on), token-in token-out,
the model mask and the metrics."""
import math
import time

import pytest

from fusedrl.engine.agents import AgentLimits, ChatRenderer, agent_metrics, run_agents
from fusedrl.engine.agents.environment import EnvironmentFailure
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from agent_testing import save_chat_model
from engine_testing import make_chat_tokenizer
from engine_testing import VOCAB

# About one sampled token in seven ends a turn early; the rest are cut at 8 tokens (the tiny model's
# context is 128 tokens: three turns and two observations fit).
PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=3,
                        stop_token_ids=tuple(t for t in range(10, VOCAB) if t % 7 == 0))
LIMITS = AgentLimits(max_turns=3, max_total_tokens=None, env_timeout_s=2.0)


class Scripted:
    """Three turns; each observation is longer than a turn; reward 1 at the end. `mode` 'raise' or
    'hang' breaks the second step."""

    def __init__(self, prompt, mode="ok"):
        self.prompt, self.mode, self.turn = prompt, mode, 0

    def reset(self):
        return [{"role": "user", "content": self.prompt}]

    def step(self, message):
        self.turn += 1
        if self.turn == 2 and self.mode == "raise":
            raise RuntimeError("the tool broke")
        if self.turn == 2 and self.mode == "hang":
            time.sleep(30)
        observation = "the lazy dog jumps over the quick brown fox"  # more tokens than a turn
        return [{"role": "user", "content": observation}], (1.0 if self.turn == 3 else 0.0), self.turn == 3


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(save_chat_model(tmp_path_factory.mktemp("chat")), dtype="float32", block_size=4)


def rollout(llm, rows, limits=LIMITS):
    renderer = ChatRenderer(make_chat_tokenizer())
    return run_agents(llm, renderer, lambda row: Scripted(**row), rows, PARAMS, limits)


def test_three_turns_with_long_observations(llm):
    rows = [{"prompt": "hello world"}, {"prompt": "the brown dog"}]
    trajectories = rollout(llm, rows)
    assert len(trajectories) == 4
    metrics = agent_metrics(trajectories)
    assert metrics["turns/max"] == 3 and metrics["env/errors"] == metrics["env/timeouts"] == 0
    assert metrics["tokens/environment"] > metrics["tokens/model"] > 0  # observations outweigh turns
    for t in trajectories:
        tokens = t.tokens
        assert sum(tokens.model_mask) == len(tokens.logprob_slots) and t.error is None
        assistant = [m for m in t.messages if m["role"] == "assistant"]
        assert len(assistant) == tokens.turns
        if tokens.finish_reason == "done":
            assert t.reward == 1.0 and tokens.turns == 3
    assert sum(t.tokens.finish_reason == "done" for t in trajectories) >= 2


def test_the_trajectory_is_what_the_model_saw_not_a_retokenization(llm):
    tok = make_chat_tokenizer()
    trajectories = rollout(llm, [{"prompt": "hello world"}])
    differs = 0
    for t in trajectories:
        ids = t.tokens.prompt_token_ids + t.tokens.token_ids
        text = tok.decode(ids)
        differs += tok.encode(text, add_special_tokens=False) != ids
    # Sampled byte-level tokens rarely re-encode to themselves: re-tokenizing would change what the
    # model is trained on; the trajectory keeps the sampled ids.
    assert differs > 0


def test_a_raising_and_a_hanging_environment_end_only_their_trajectories(llm):
    rows = [{"prompt": "hello", "mode": "raise"}, {"prompt": "world", "mode": "hang"},
            {"prompt": "fox", "mode": "ok"}]
    start = time.monotonic()
    trajectories = rollout(llm, rows, AgentLimits(3, None, env_timeout_s=0.5))
    assert time.monotonic() - start < 20
    errors = [t.error for t in trajectories]
    metrics = agent_metrics(trajectories)
    assert metrics["env/errors"] == sum(e is not None for e in errors)  # timeouts among them
    assert all(trajectories[i].error in (None, "error") for i in (0, 1))
    assert all(trajectories[i].error in (None, "timeout") for i in (2, 3))
    assert all(math.isnan(t.reward) for t in trajectories if t.error)  # no score: never 0
    assert any(t.error == "error" and "the tool broke" in t.error_text for t in trajectories)
    assert metrics["env/timeouts"] >= 1 and metrics["env/step_seconds"] >= 0.5


def test_env_errors_fail_stops_the_run_in_one_line(llm):
    with pytest.raises(EnvironmentFailure, match="raised RuntimeError: the tool broke"):
        rollout(llm, [{"prompt": "hello", "mode": "raise"}] * 2,
                AgentLimits(3, None, env_timeout_s=2.0, env_errors="fail"))

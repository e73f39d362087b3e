"""Attacks on multi-turn rollouts, on a tiny chat model with hostile environments and tools
(agent_fault_envs.py) in their worker processes: a crash leaves the batch (never scored), a
wrong-typed tool argument is the model's mistake, a forged turn stays a tool's text, a 100 MB
observation and a 10**400 reward are one line, a hanging tool or a GIL-holding or leaking
environment is contained and leaves nothing behind."""
import json
import math
import threading

import pytest
import torch

from fusedrl.engine.agents import (AgentLimits, ChatRenderer, EnvSource, ToolEnvironment,
                                   agent_metrics, parse_hermes, run_agents, tool_schema)
from fusedrl.engine.agents.environment import EnvironmentFailure
from fusedrl.engine.agents.agent_loop import opener, reset_environment, EnvState, step_environment
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.stages.rollout.group_advantages import group_token_advantages
from fusedrl.engine.stages.rollout.reward_scores import trajectory_inputs
from fusedrl.engine.stages.rewards.combined import open_reward_functions
from fusedrl.engine.stages.rewards.functions import RewardFunctionError, RewardInputs
from fusedrl.kernels import group_advantages
from agent_fault_envs import FORGED, add, strict_chat_tokenizer, stuck
from agent_testing import save_chat_model, tool_call
from engine_testing import VOCAB, make_chat_tokenizer

PARAMS = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=3,
                        stop_token_ids=tuple(t for t in range(10, VOCAB) if t % 7 == 0))
HOSTILE = EnvSource("agent_fault_envs:Hostile")


def limits(**overrides):
    return AgentLimits(**{"max_turns": 2, "max_total_tokens": None, "env_timeout_s": 5.0,
                          **overrides})


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(save_chat_model(tmp_path_factory.mktemp("chat")), dtype="float32", block_size=4)


def rollout(llm, modes, tokenizer=None, **overrides):
    renderer = ChatRenderer(tokenizer or make_chat_tokenizer())
    rows = [{"prompt": "hello world", "mode": mode} for mode in modes]
    return run_agents(llm, renderer, HOSTILE, rows, PARAMS, limits(**overrides))


class Row:
    def __init__(self, prompt):
        self.prompt, self.columns = prompt, {}


@pytest.mark.parametrize("isolation", ["process", "thread"])
def test_a_crashing_environment_leaves_the_batch_unscored(llm, isolation):
    crashed, fine = rollout(llm, ["crash", "ok"], env_isolation=isolation)[::2]
    assert crashed.error == "error" and "RuntimeError: the environment broke" in crashed.error_text
    assert math.isnan(crashed.reward) and fine.reward == 1.0  # no score at all, never 0
    assert "\n" not in crashed.error_text and "agent_fault_envs:Hostile" in crashed.error_text


def test_an_environment_s_worker_loads_no_torch():
    """The worker a trajectory's environment runs in (one per trajectory) starts in a fraction of a
    second: it imports the agents package, whose torch-importing part loads on first use."""
    from fusedrl.engine.agents.isolation import ProcessEnvironment

    env = ProcessEnvironment(EnvSource("agent_envs:LoadedLibraries"), {"prompt": "hi"}, 1000)
    try:
        assert env.reset(30.0) == [{"role": "user", "content": ""}]
    finally:
        env.close()


def test_a_group_s_advantages_are_computed_without_its_crashed_trajectory():
    # Group 0: rows 0-3, row 1 crashed (no trained token, no score); group 1 intact.
    scores = torch.tensor([1.0, float("nan"), 0.0, 0.5, 0.2, 0.9, 0.4, 0.1])
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[1] = False
    for estimator in ["grpo", "rloo", "dr_grpo", "reinforce_pp_baseline"]:
        got = group_token_advantages(scores, mask, 4, estimator)[:, 0]
        assert got[1] == 0 and torch.isfinite(got).all()
        if estimator != "reinforce_pp_baseline":  # batch-whitened: the groups mix
            torch.testing.assert_close(got[[0, 2, 3]], group_advantages(
                scores[[0, 2, 3]].view(1, 3), estimator=estimator).view(-1))
            torch.testing.assert_close(got[4:], group_advantages(
                scores[4:].view(1, 4), estimator=estimator).view(-1))


def test_a_wrong_typed_tool_argument_is_told_to_the_model():
    env = ToolEnvironment({"add": add}, parse_hermes, "hi")
    for arguments, said in [({"a": "two", "b": 3}, "'a' is str 'two': expected integer"),
                            ({"a": 2}, "needs the argument 'b'"),
                            ({"a": 1, "b": 2, "c": 3}, "takes no argument 'c'"),
                            ({"a": True, "b": 2}, "'a' is bool True: expected integer")]:
        messages, reward, done = env.step({"content": tool_call("add", **arguments)})
        assert not done and messages == [{"role": "tool", "name": "add",
                                          "content": messages[0]["content"]}]
        assert messages[0]["content"].startswith("error: add") and said in messages[0]["content"]
    assert env.step({"content": tool_call("add", a=2, b=3)})[0][0]["content"] == "5"


def test_a_forged_turn_stays_tool_text_in_ids_and_for_the_reward_function(llm):
    tokenizer = make_chat_tokenizer()
    renderer = ChatRenderer(tokenizer)
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids("<|r2|>")}
    forged = renderer.continuation([{"role": "tool", "content": FORGED}])
    plain = renderer.continuation([{"role": "tool", "content": "x"}])
    # Exactly the template's own special ids: the forged EOS and turn-starts are text.
    assert [i for i in forged if i in special] == [i for i in plain if i in special]
    assert tokenizer.decode(forged).count(FORGED) == 1
    trajectories = rollout(llm, ["forge"])
    for t in trajectories:
        assert t.error is None
        env_ids = [i for i, own in zip(t.tokens.token_ids, t.tokens.model_mask) if not own]
        assert sum(i == tokenizer.eos_token_id for i in env_ids) <= 2  # the template's only
    inputs = trajectory_inputs(trajectories, [Row("hello world")] * 2)
    for messages, said in zip(inputs.completions(), inputs.completion_texts):
        assert [m["role"] for m in messages][:2] == ["assistant", "tool"]
        assert all("10/10" not in m["content"] for m in messages if m["role"] != "tool")
        assert "10/10" not in said  # the model's own turns only
    import agent_fault_envs
    scores = agent_fault_envs.judge(inputs.prompts, inputs.completions())
    assert scores == [0.0, 0.0]  # a judge that believes user turns finds none


def test_a_100_mb_observation_is_refused_in_one_line(llm):
    trajectories = rollout(llm, ["huge"])
    for t in trajectories:
        assert t.error == "error" and "\n" not in t.error_text
        assert t.error_text == ("rollout.environment=agent_fault_envs:Hostile: step() returned "
                                "104857600 characters of messages, over "
                                "rollout.max_observation_chars=100000")
    with pytest.raises(EnvironmentFailure, match="max_observation_chars=100000 "
                                                 r"\(rollout.env_errors=fail\)$"):
        rollout(llm, ["huge"], env_errors="fail")


def test_a_reward_of_ten_to_the_400_is_one_line(llm):
    t = rollout(llm, ["overflow"])[0]
    assert t.error == "error" and "\n" not in t.error_text and "1329 bits" in t.error_text
    functions = open_reward_functions(["agent_fault_envs:huge_score"], None, "process", 30.0)
    try:
        with pytest.raises(RewardFunctionError, match=r"returned an integer of 1329 bits as "
                                                      r"score 0: beyond any float") as caught:
            functions(RewardInputs(["p"], ["p"], ["c"], [[1]]))
        assert "\n" not in str(caught.value)
    finally:
        functions.close()


def test_a_role_the_template_refuses_is_an_environment_error_under_skip(llm):
    trajectories = rollout(llm, ["role", "ok"], tokenizer=strict_chat_tokenizer())
    assert all(t.error == "error" and "unknown role judge" in t.error_text
               for t in trajectories[:2])
    assert all(t.error is None for t in trajectories[2:])


def test_a_hanging_tool_is_killed_at_its_deadline_with_no_thread_left():
    source = EnvSource(tools=("agent_fault_envs:add", "agent_fault_envs:stuck"),
                       schemas={"add": tool_schema(add), "stuck": tool_schema(stuck)})
    renderer, tokenizer = ChatRenderer(make_chat_tokenizer()), make_chat_tokenizer()
    before = set(threading.enumerate())
    lim = limits(env_timeout_s=1.0)
    state = EnvState(opener(source, lim)({"prompt": "hi"}))
    reset_environment(state, lim)
    worker = state.env.process
    assert not step_environment(state, renderer, tokenizer.encode(tool_call("add", a=2, b=3)), lim).done
    reply = step_environment(state, renderer, tokenizer.encode(tool_call("stuck", x=1)), lim)
    assert reply.done and state.error == "timeout" and "env_timeout_s=1" in state.error_text
    assert worker.poll() is not None and state.env.process is None  # killed and reaped
    assert set(threading.enumerate()) == before


@pytest.mark.parametrize("mode", ["gil", "leak", "exit"])
def test_a_gil_holding_leaking_or_exiting_environment_is_contained(llm, mode):
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    beats = []
    alive = threading.Event()
    alive.set()

    def heartbeat():  # runs only while the trainer's GIL is free
        while alive.is_set():
            beats.append(1)
            threading.Event().wait(0.01)
    # A first rollout in this process starts the engine's own host memory (on a GPU: the CUDA
    # context, cuBLAS, the decode graphs; ~180 MB), which is not the environment's.
    rollout(llm, ["ok"])
    before, ticker = rss(), threading.Thread(target=heartbeat)
    ticker.start()
    try:
        trajectories = rollout(llm, [mode], env_timeout_s=3.0)
    finally:
        alive.clear()
        ticker.join()
    assert rss() - before < 150 << 20  # the 300 MB an environment keeps went with its worker
    if mode == "gil":
        assert all(t.error == "timeout" for t in trajectories) and len(beats) > 10
    if mode == "exit":
        assert all(t.error == "error" and "exit code 0" in t.error_text for t in trajectories)
    if mode == "leak":
        assert all(t.error is None for t in trajectories)
    assert agent_metrics(trajectories)["env/errors"] == sum(t.error is not None
                                                             for t in trajectories)
    json.dumps([t.error_text for t in trajectories])

"""GRPO on multi-turn trajectories (rollout.environment, rollout.tools) through the Python API on a
tiny chat model: several turns with observations longer than the answers, the loss on the model's
tokens only, and tools that raise or hang ending their trajectory without stalling anything."""
import datasets
import pytest

import fusedrl.kernels as kernels
from fusedrl.engine import GRPOConfig, run_grpo
from fusedrl.engine.agents import AgentLimits, ChatRenderer, ToolEnvironment, parse_hermes, tool_schema
from fusedrl.engine.agents.isolation import ThreadEnvironment
from fusedrl.engine.agents.agent_loop import reset_environment, EnvState, step_environment
from fusedrl.engine.sandbox import detect
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import add, broken, save_chat_model, stuck, tool_call
from engine_testing import VOCAB, make_chat_tokenizer
from invariant_testing import one_thread  # noqa: F401 (autouse: one intra-op thread)

ROWS = [{"prompt": "hello world", "level": 1}, {"prompt": "the brown dog", "level": 2}]


@pytest.fixture(autouse=True)
def torch_kernels():
    with kernels.use_backend("torch"):  # the engine's wiring is under test, not the kernels
        yield


def grpo(tmp_path, model, rollout, rows=ROWS, iterations=2, **options):
    config = GRPOConfig.from_dict({
        "policy": str(model), "output_dir": str(tmp_path / "grpo"), **options,
        "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                    "kv_cache_memory": 1 << 22, "max_prompt_length": 40, "temperature": 1.0,
                    **rollout},
        "ppo": {"minibatch_size": 4},
        "train": {"iterations": iterations, "progress": False, "device": "cpu"}})
    result = run_grpo(config, dataset=datasets.Dataset.from_list(rows))
    return [r for r in read_metrics(result.output_dir) if r["kind"] == "train"]


def test_an_environment_of_three_turns_trains_on_the_model_tokens_only(tmp_path, capfd):
    model = save_chat_model(tmp_path / "chat")
    records = grpo(tmp_path, model, {"environment": "agent_envs:ThreeTurns", "max_turns": 3},
                   iterations=1)
    # The sandbox's mode is said at the start and recorded with the run.
    info = next(r for r in read_metrics(tmp_path / "grpo") if r["kind"] == "info")
    assert info["sandbox"] == detect().kind
    assert f"fusedrl: sandbox: {detect().kind}" in capfd.readouterr().err
    assert len(records) == 1
    for r in records:
        assert r["turns/max"] <= 3 and r["turns/mean"] >= 2.5  # a turn cut at 6 tokens is answered
        assert r["tokens/environment"] > r["tokens/model"] > 0
        assert r["tokens"] == r["tokens/model"]  # the loss's tokens: the model's alone
        assert r["env/errors"] == r["env/timeouts"] == 0


def test_crashed_trajectories_leave_the_batch_and_are_never_scored(tmp_path):
    """One prompt's environments crash (agent_fault_envs.Hostile): its trajectories are not trained
    and not scored (a score of 0 would halve score_mean), the other group trains."""
    model = save_chat_model(tmp_path / "chat")
    rows = [{"prompt": "hello world", "mode": "crash"}, {"prompt": "the brown dog", "mode": "ok"}]
    records = grpo(tmp_path, model, {"environment": "agent_fault_envs:Hostile", "max_turns": 2},
                   rows=rows)
    assert len(records) == 2
    for r in records:
        assert r["env/errors"] == 2 and not r.get("skipped") and r["dropped_rows"] == 0
        assert r["score_mean"] == 1.0 and r["score_std"] == 0.0  # the crashed ones: no score
        assert 0 < r["tokens"] < r["tokens/model"]  # the crashed ones' tokens are not trained
    every = grpo(tmp_path / "all", model, {"environment": "agent_fault_envs:Hostile"},
                 rows=[{**row, "mode": "crash"} for row in rows])
    assert [r["skipped_steps"] for r in every] == [1, 2]  # said as "no update (every trajectory
    assert all(r["env/errors"] == 4 and "loss" not in r for r in every)  # left the batch ...)"


def test_tools_are_offered_and_a_turn_without_a_call_ends_the_trajectory(tmp_path):
    # The tools' schemas open every conversation: ~900 tokens of the tests' small vocabulary.
    model = save_chat_model(tmp_path / "chat", max_position_embeddings=1024)
    tools = "agent_envs:add,agent_envs:broken,agent_envs:stuck"
    records = grpo(tmp_path, model, {"tools": tools, "max_turns": 2, "env_timeout_s": 1.0},
                   iterations=1, reward_fn="reward_testing:vowel_fraction")
    # A random model writes no tool call: each trajectory is its one answer.
    assert len(records) == 1
    assert all(r["turns/max"] == 1 and r["tokens/environment"] == 0 for r in records)
    assert all("rewards/vowel_fraction/mean" in r for r in records)


@pytest.mark.parametrize("tool, error", [(broken, "error"), (stuck, "timeout")])
def test_a_raising_or_hanging_tool_ends_its_trajectory_in_time(tool, error):
    tokenizer = make_chat_tokenizer()
    tools = {"add": add, tool.__name__: tool}
    renderer = ChatRenderer(tokenizer, [tool_schema(fn) for fn in tools.values()])
    state = EnvState(ThreadEnvironment(lambda row: ToolEnvironment(tools, parse_hermes, "hi"), {},
                                     max_chars=1000))
    limits = AgentLimits(max_turns=3, max_total_tokens=None, env_timeout_s=0.5)
    reset_environment(state, limits)
    answered = step_environment(state, renderer, tokenizer.encode(tool_call("add", a=2, b=3)), limits)
    assert not answered.done and state.messages[-1] == {"role": "tool", "name": "add", "content": "5"}
    reply = step_environment(state, renderer, tokenizer.encode(tool_call(tool.__name__, x=1)), limits)
    assert reply.done and state.error == error and state.seconds < 5


def test_lora_trains_on_three_turn_trajectories(tmp_path):
    """LoRA: the sampler generates every turn through the adapters and the update trains them on the
    model's tokens."""
    model = save_chat_model(tmp_path / "chat")
    records = grpo(tmp_path / "lora", model, {"environment": "agent_envs:ThreeTurns", "max_turns": 3},
                   lora={"rank": 4})
    assert len(records) == 2 and all(r["turns/mean"] >= 2.5 and r["tokens"] == r["tokens/model"] for r in records)


def test_an_moe_policy_trains_across_turns_without_routing_replay(tmp_path):
    """An MoE policy with routing_replay=false: its trajectories route freely in training, nothing
    replayed (with it on: test_rollout_options_compose.py)."""
    from moe_testing import make_moe_model
    moe = tmp_path / "moe"
    make_moe_model("qwen3_moe").save_pretrained(moe)
    make_chat_tokenizer().save_pretrained(moe)
    three = {"environment": "agent_envs:ThreeTurns", "max_turns": 3, "routing_replay": False}
    records = grpo(tmp_path / "no-replay", moe, three, iterations=1)
    assert len(records) == 1 and records[0]["turns/max"] <= 3 and records[0]["tokens/model"] > 0
    assert "routing/replayed_tokens" not in records[0]

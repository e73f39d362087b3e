"""`fusedrl demo task=tool`: its task (numbers, judge, reward), its tool and tokenizer, its SFT rows
through the tool_calls data path, its config, and the whole demo on a very short setting."""
import json
import random
import types

import pytest

from fusedrl.engine import cli
from fusedrl.engine.agents import (AgentLimits, ChatRenderer, EnvSource, parse_hermes,
                                   parser_for as call_parser, run_agents, tool_schema)
from fusedrl.engine.config.demo import DemoConfig
from fusedrl.engine.data.packing import collate_sft
from fusedrl.engine.data.records import parser_for
from fusedrl.engine.data.prompts import PromptRow
from fusedrl.engine.data.tokenization import tokenize_record
from fusedrl.engine.demos.tool import TOOLS
from fusedrl.engine.demos.tool_task import (add, build_tokenizer, conversation, final_answer, is_correct,
                                            make_pairs, question, tool_reward, write_tool_data)
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.sequence import Sequence
from fusedrl.engine.stages.rollout.reward_scores import trajectory_inputs


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_the_tool_is_a_plain_function_with_a_schema():
    assert add(482, 377) == 859
    schema = tool_schema(add)["function"]
    assert schema["name"] == "add" and set(schema["parameters"]["properties"]) == {"a", "b"}


def test_pairs_have_fixed_lengths_and_held_out_ones_are_new():
    rng = random.Random(0)
    train = make_pairs(200, 3, rng)
    held_out = make_pairs(50, 3, rng, exclude=set(train))
    assert len(set(train)) == 200 and not set(train) & set(held_out)
    # Every number and every sum of 3 digits: each copy spans a fixed distance.
    assert all(len(str(a)) == len(str(b)) == len(str(a + b)) == 3 for a, b in train + held_out)


def test_the_judge_reads_the_last_turn():
    assert is_correct("482 + 377", " 859") and not is_correct("482 + 377", "858")
    called = [{"role": "assistant", "content": '<tool_call>{"name": "add"}</tool_call>'},
              {"role": "tool", "name": "add", "content": "859"}]
    assert final_answer(called + [{"role": "assistant", "content": "859"}]) == "859"
    assert final_answer([]) == ""
    # A trajectory cut after its tool call has no final answer.
    assert final_answer(called).startswith("<tool_call>")


def scripted_policy(tok, turns: list[list[str]]):
    """An engine (run and config, as run_agents takes LLM) that says each row's scripted turns (one
    sample per row), each closed by the template's end of turn, with the environment's replies
    between them as the engine's: each turn handed to the on_end hook, its reply (or None, the
    end) taken as LLM.run takes it."""
    def run(requests, stop, on_end):
        seqs = []
        for i, (request, said) in enumerate(zip(requests, turns)):
            seq = Sequence(i, request, 0)
            for text in said:
                seq.turn_start = seq.num_tokens
                turn = tok.encode(text + "<|im_end|>", add_special_tokens=False)
                seq.token_ids += turn
                seq.logprobs += [0.0] * len(turn)
                reply = on_end(i, seq)
                reply = reply.result() if hasattr(reply, "result") else reply
                if reply is None:
                    break
                seq.token_ids += reply
            seqs.append(seq)
        return seqs
    return types.SimpleNamespace(run=run, config=types.SimpleNamespace(max_model_len=1024))


def test_the_reward_judges_what_the_trainer_hands_it(tok):
    """Trajectories through the rollout's tool environment, their reward inputs built as the
    trainer builds them (the model's ids alone, the messages with their roles): a copied result is
    right, a miscopied one or a last turn that calls the tool again is wrong."""
    call = '<tool_call>{"name": "add", "arguments": {"a": 482, "b": 377}}</tool_call>'
    turns = [[call, "859"], [call, "858"], ["859"], ["858"], [call, call]]
    source = EnvSource(tools=tuple(TOOLS), schemas={"add": tool_schema(add)})
    trajectories = run_agents(scripted_policy(tok, turns), ChatRenderer(tok, [tool_schema(add)]),
                              source, [{"prompt": "482 + 377"}] * len(turns), SamplingParams(n=1),
                              AgentLimits(2, None, 5.0, env_isolation="thread"))
    assert [t.error for t in trajectories] == [None] * len(turns)
    assert trajectories[0].messages[2] == {"role": "tool", "name": "add", "content": "859"}
    inputs = trajectory_inputs(trajectories, [PromptRow([], "482 + 377")] * len(turns))
    assert tool_reward(**inputs.keywords()) == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_the_tokenizer_round_trips_and_its_template_calls_tools(tok):
    text = tok.apply_chat_template(conversation(482, 377, call=True), tools=[tool_schema(add)], tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert call_parser(tok) is parse_hermes
    call = text.split("<|im_start|>assistant\n", 1)[1].split("<|im_end|>")[0]
    assert [(c.name, c.arguments) for c in parse_hermes(call)] == [("add", {"a": 482, "b": 377})]
    assert tok.decode([ChatRenderer(tok, [tool_schema(add)]).end_of_turn_id]) == "<|im_end|>"


def test_sft_rows_train_the_call_and_the_answer_only(tmp_path, tok):
    cfg = DemoConfig(task="tool", train_prompts=20, eval_prompts=5, tool_calls=0.5)
    data = write_tool_data(cfg, tmp_path, [tool_schema(add)])
    rows = [json.loads(line) for line in open(data["sft"])]
    assert len(rows) == 20 and len(data["held_out"]) == 5 and all(r["tools"] for r in rows)
    row = next(r for r in rows if len(r["messages"]) == 4)  # one that calls the tool
    a, b = map(int, row["messages"][0]["content"].split(" + "))
    batch = collate_sft([tokenize_record(tok, parser_for("sft", "auto")(row), 128, 64)])
    trained = batch.target_ids.tolist()
    call = '<tool_call>{"name": "add", "arguments": {"a": %d, "b": %d}}</tool_call><|im_end|>' % (a, b)
    assert tok.decode(trained) == call + f"{a + b}<|im_end|>"  # the tool's result is context
    assert question(a, b) in tok.decode(batch.input_ids.tolist())


def test_grpo_asks_questions_the_sft_data_did_not(tmp_path):
    cfg = DemoConfig(task="tool", train_prompts=50, eval_prompts=10)
    data = write_tool_data(cfg, tmp_path, [tool_schema(add)])
    sft = {json.loads(line)["messages"][0]["content"] for line in open(data["sft"])}
    rl = [json.loads(line)["prompt"] for line in open(data["prompts"])]
    assert len(rl) == len(set(rl)) == 50
    assert not set(rl) & sft and not set(rl) & set(data["held_out"])
    assert not sft & set(data["held_out"])


def test_config_defaults_per_task_and_errors():
    sort, tool = DemoConfig(), DemoConfig(task="tool")
    assert (sort.digits, sort.sft_epochs, sort.algo, sort.rl_iterations) == (4, 4, "ppo", 100)
    assert (tool.digits, tool.sft_epochs, tool.algo, tool.rl_iterations) == (3, 8, "grpo", 30)
    # Each task its own directory: the README's `fusedrl demo`, then `fusedrl demo task=tool`.
    assert (sort.output_dir, tool.output_dir) == ("fusedrl-demo", "fusedrl-demo-tool")
    assert DemoConfig(task="tool", output_dir="mine").output_dir == "mine"
    with pytest.raises(ValueError, match="algo must be grpo with task=tool"):
        DemoConfig(task="tool", algo="ppo")
    with pytest.raises(ValueError, match=r"tool_calls must be in \[0, 1\], got 1.5"):
        DemoConfig(task="tool", tool_calls=1.5)


def test_tool_demo_end_to_end(tmp_path, capsys, cpu_user_backend, monkeypatch):
    """After the sorting demo, in the same folder, as the README runs them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fusedrl-demo").mkdir()
    (tmp_path / "fusedrl-demo" / "results.json").write_text("{}")  # the sorting demo's run
    out = tmp_path / "fusedrl-demo-tool"
    assert cli.main(["demo", "task=tool", "train_prompts=16", "eval_prompts=2", "sft_epochs=1",
                     "rl_iterations=1", "rl_prompts=2", "eval_samples=2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "GRPO accuracy (held-out, sampled, with the tool)" in printed and "GRPO gain over SFT" in printed
    assert "results: fusedrl-demo-tool/results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "tool" and 0 <= results["sft_tool_rate"] <= 1
    assert list(results["stage_seconds"]) == ["setup", "sft", "evaluations", "rl"]
    assert "time by stage" in printed and "GRPO " in printed.split("time by stage")[1]
    train = [json.loads(line) for line in open(out / "rl" / "metrics.jsonl") if '"train"' in line]
    assert train and "turns/mean" in train[-1] and train[-1]["tokens"] == train[-1]["tokens/model"]
    assert (out / "rl" / "final" / "model.safetensors").exists()

"""TRL-shaped data through whole stages on a tiny chat-templated model: the Python API on
`datasets.Dataset`s and config dicts, the command on Parquet/CSV files and message-list prompts."""
import json

import datasets
import pytest
import torch

import fusedrl.kernels as kernels
from fusedrl.engine import GRPOConfig, SFTConfig, UsageError, run_grpo, run_rm, run_sft
from fusedrl.engine.cli import main
from fusedrl.engine.data.prompts import PromptRow
from fusedrl.engine.stages.rollout.packs import pack_rollout
from fusedrl.engine.stages.rollout.scored_rows import Samples
from fusedrl.engine.stages.rollout.state import PPOState
from fusedrl.engine.stages.rollout.prompt_stream import next_prompts
from fusedrl.engine.train.runlog import read_metrics
from engine_testing import make_chat_tokenizer, make_hf_model

TRAIN = {"max_steps": 2, "progress": False, "device": "cpu"}
DATA = {"max_length": 48, "max_prompt_length": 24, "tokens_per_batch": 256, "eval_fraction": 0.0}
QUESTIONS = [("what is one plus one?", "2"), ("the quick brown fox?", "jumps"), ("hello?", "world"),
             ("the lazy dog?", "sleeps")]


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture(autouse=True)
def torch_kernels():
    """The PyTorch references of the kernels: these tests are about the data (the Triton interpreter
    would take seconds per step)."""
    with kernels.use_backend("torch"):
        yield


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny Qwen2 whose tokenizer has a chat template."""
    path = tmp_path_factory.mktemp("chat_model")
    make_hf_model("qwen2").save_pretrained(path)
    make_chat_tokenizer().save_pretrained(path)
    return path


def conversations():
    return [{"messages": [msg("user", q), msg("assistant", a), msg("user", "and?"),
                          msg("assistant", a + " again")]} for q, a in QUESTIONS]


def test_sft_from_python_on_a_dataset_of_conversations(chat_model, tmp_path):
    config = {"model": str(chat_model), "output_dir": str(tmp_path / "sft"), "data": DATA,
              "train": TRAIN}
    result = run_sft(config, dataset=datasets.Dataset.from_list(conversations()),
                     overrides=["optim.lr=1e-3"])
    assert (result.final_dir / "config.json").is_file() and result.output_dir == tmp_path / "sft"
    assert result.metrics["kind"] == "train" and result.metrics["step"] == 2
    assert result.metrics["loss"] > 0
    with pytest.raises(UsageError, match="data.train_file is required .*, or pass dataset="):
        run_sft(SFTConfig(model=str(chat_model), output_dir=str(tmp_path / "none")))


def test_the_api_reads_dicts_and_yaml_and_raises_instead_of_exiting(chat_model, tmp_path):
    (tmp_path / "grpo.yaml").write_text(f"policy: {chat_model}\noutput_dir: {tmp_path / 'o'}\n")
    config = GRPOConfig.from_yaml(tmp_path / "grpo.yaml", ["rollout.max_new_tokens=7"])
    assert config.rollout.max_new_tokens == 7 and config.ppo.estimator == "grpo"
    with pytest.raises(ValueError, match=r"unknown config key 'optim.learning_rate' \(did you"):
        run_sft({"model": str(chat_model), "output_dir": str(tmp_path / "o"),
                 "optim": {"learning_rate": 1e-4}})
    with pytest.raises(UsageError, match="prompts_file is required"):
        run_grpo(config)
    with pytest.raises(UsageError, match=r"data.train_file=.*missing\.jsonl: no such file"):
        run_sft({"model": str(chat_model), "output_dir": str(tmp_path / "o"),
                 "data": {"train_file": str(tmp_path / "missing.jsonl")}})
    with pytest.raises(UsageError, match=r"^data.train_file=trl-lib/Capybara: .*downloaded"):
        run_sft({"model": str(chat_model), "output_dir": str(tmp_path / "o"),
                 "data": {"train_file": "trl-lib/Capybara"}})
    assert not (tmp_path / "o").exists()  # refused before the run directory was made


def test_reward_model_from_python_on_implicit_conversational_preferences(chat_model, tmp_path):
    rows = [{"chosen": [msg("user", q), msg("assistant", a)],
             "rejected": [msg("user", q), msg("assistant", "no")]} for q, a in QUESTIONS]
    config = {"model": str(chat_model), "output_dir": str(tmp_path / "rm"), "data": DATA,
              "train": TRAIN}
    result = run_rm(config, dataset=datasets.Dataset.from_list(rows))
    assert result.metrics["step"] == 2 and 0 <= result.metrics["accuracy"] <= 1
    assert (result.final_dir / "config.json").is_file()


@pytest.mark.parametrize("stage, rows, suffix", [
    ("sft", [{"prompt": [msg("user", q)], "completion": [msg("assistant", a)]}
             for q, a in QUESTIONS], "parquet"),
    ("sft", [{"text": f"{q} {a}"} for q, a in QUESTIONS], "csv"),
    ("rm", [{"chosen": f"{q} {a}", "rejected": f"{q} no"} for q, a in QUESTIONS], "json"),
])
def test_the_command_reads_each_format_from_files(chat_model, tmp_path, capsys, stage, rows,
                                                  suffix):
    path = str(tmp_path / f"data.{suffix}")
    data = datasets.Dataset.from_list(rows)
    write = {"parquet": data.to_parquet, "csv": lambda p: data.to_csv(p, index=False),
             "json": data.to_json}
    write[suffix](path)
    argv = [stage, f"model={chat_model}", f"output_dir={tmp_path / 'run'}",
            f"data.train_file={path}", "data.eval_fraction=0", "data.max_length=48",
            "data.max_prompt_length=24", "train.max_steps=2", "train.progress=false",
            "train.device=cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][-1] == 2


def test_grpo_from_python_on_message_list_prompts_with_columns(chat_model, tmp_path):
    rows = [{"prompt": [msg("system", "answer briefly"), msg("user", q)], "solution": a}
            for q, a in QUESTIONS]
    seen = []

    def vowels(prompts, responses):
        seen.append(len(responses))
        return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]

    config = GRPOConfig.from_dict({
        "policy": str(chat_model), "output_dir": str(tmp_path / "grpo"),
        "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 4,
                    "kv_cache_memory": 1 << 22, "max_prompt_length": 40},
        "ppo": {"minibatch_size": 4}, "reward": {"isolation": "thread"},  # `seen` is this process's
        "train": {"iterations": 1, "progress": False, "device": "cpu"}})
    result = run_grpo(config, reward_fn=vowels, dataset=datasets.Dataset.from_list(rows))
    assert seen == [4] and result.metrics["step"] == 1 and "score_mean" in result.metrics
    exported = json.loads((result.output_dir / "final" / "config.json").read_text())
    assert exported["model_type"] == "qwen2"


def test_the_prompt_rows_follow_their_samples():
    prompts = [PromptRow([10 + i], f"p{i}", {"solution": str(i)}) for i in range(3)]
    state = PPOState(kl_coef=0.0)
    batch = next_prompts(prompts, 2, seed=0, state=state)
    assert len(batch) == 2 and state.prompts_drawn == 2
    assert all(isinstance(p, PromptRow) for p in batch)
    rows = [p for p in batch for _ in range(2)]
    packed = pack_rollout([p.ids for p in rows], [[5]] * 4, "cpu")
    samples = Samples([p.ids for p in rows], [[5]] * 4, packed, torch.zeros(4, 1),
                      torch.arange(4.0), 2, rows)
    assert samples.take_groups([1]).sources == rows[2:]
    assert Samples.concat([samples, samples.take_groups([0])]).sources == rows + rows[:2]


def test_fusedrl_grpo_on_message_list_prompts(chat_model, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [msg("user", q)], "solution": a}) + "\n"
                               for q, a in QUESTIONS))
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    argv = ["grpo", f"policy={chat_model}", f"prompts_file={prompts}", f"output_dir={tmp_path / 'run'}",
            "reward_fn=reward_testing:vowel_fraction", "rollout.prompts_per_iteration=2",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=4",
            "rollout.kv_cache_memory=4194304", "ppo.minibatch_size=4", "train.iterations=1",
            "train.progress=false", "train.device=cpu"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "final" / "config.json").is_file()

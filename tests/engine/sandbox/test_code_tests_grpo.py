"""The sandbox in a GRPO run (the Python API on a tiny chat model): the code_tests reward in its
worker process and the python tool offered, the mode said and recorded; under a weak mode not
asked for, the run is refused at its start, in one line, before any model is loaded."""
import datasets
import pytest

import fusedrl.kernels as kernels
from fusedrl.engine import GRPOConfig, run_grpo
from fusedrl.engine.sandbox import SandboxRefused, detect, isolation
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model

ROWS = [{"prompt": "write add", "tests": ["assert add(1, 2) == 3"]},
        {"prompt": "write neg", "tests": ["assert neg(4) == -4"]}]


def config(tmp_path, model: str) -> GRPOConfig:
    return GRPOConfig.from_dict({
        "policy": model, "output_dir": str(tmp_path / "grpo"),
        "reward_fn": "fusedrl.engine.sandbox.code_tests:code_tests",
        "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                    "kv_cache_memory": 1 << 22, "max_prompt_length": 40,
                    "tools": ["fusedrl.engine.sandbox:python"], "max_turns": 2},
        "ppo": {"minibatch_size": 4}, "train": {"iterations": 1, "progress": False,
                                                "device": "cpu"}})


@pytest.mark.skipif(not detect().strong, reason=detect().describe())
def test_code_tests_and_the_python_tool_in_a_run(tmp_path):
    model = save_chat_model(tmp_path / "chat", max_position_embeddings=1024)  # the tool's schema
    with kernels.use_backend("torch"):
        result = run_grpo(config(tmp_path, str(model)), dataset=datasets.Dataset.from_list(ROWS))
    records = read_metrics(result.output_dir)
    info = next(r for r in records if r["kind"] == "info")
    train = [r for r in records if r["kind"] == "train"]
    assert info["sandbox"] == "bwrap"
    assert train and train[0]["rewards/code_tests/mean"] == 0.0  # a random model's code fails


def test_a_weak_sandbox_not_asked_for_refuses_the_run_at_its_start(tmp_path, monkeypatch):
    weak = isolation.Isolation("none", network=False, filesystem=False, pids=False,
                               why_not_strong="bwrap not found")
    monkeypatch.setattr(isolation, "detect", lambda prefer="auto": weak)
    monkeypatch.setenv(isolation.ALLOW_WEAK_ENV, "0")
    # No model at that path: the refusal comes before anything is loaded.
    with pytest.raises(SandboxRefused, match="sandbox.allow_weak_isolation=true"):
        run_grpo(config(tmp_path, str(tmp_path / "no-model")),
                 dataset=datasets.Dataset.from_list(ROWS))

"""Short seeded runs of every stage give the tokens and losses recorded in seeded_record.json:
SFT, RM, PPO, GRPO (with dynamic sampling), partial rollouts, multi-turn trajectories (whole
groups and carried) and distillation. The record holds, per run, a digest of every token the
engine sampled (each sequence's token ids, in the order the engine returned them) and every
logged figure of the train records that is not a clock's (losses, rewards, KL, lengths).

The tokens are exact; the figures within a relative 1e-5 or an absolute 2e-6 (another CPU's torch
kernels sum in other orders: fp32 rounding), log-prob mismatches left out; under the torch version the
record names (another version may round a step differently; the test then says so and skips). A change that
means to alter a stream rewrites the record on purpose:
`python tests/engine/stages/test_seeded_record.py` (run from the repository root).
"""
import hashlib
import json
import pathlib
import sys
import tempfile

import datasets
import pytest
import torch

import fusedrl.kernels as kernels
from fusedrl.engine import run_grpo, run_ppo, run_rm, run_sft
from fusedrl.engine.config.distill import DistillConfig
from fusedrl.engine.inference.hybrid_actor import HybridActor
from fusedrl.engine.stages.distill.trainer import train_distill
from fusedrl.engine.train.runlog import read_metrics

HERE = pathlib.Path(__file__).resolve().parent
RECORD = HERE / "seeded_record.json"
# Figures a clock or the machine's load decides, never a seed.
CLOCKS = ("time", "seconds", "per_s", "_s/", "throughput", "mfu", "mem", "elapsed", "eta")
ROWS = [{"prompt": "the dog the dog"}, {"prompt": "a fox jumps"}, {"prompt": "hello world"},
        {"prompt": "lazy brown dog"}]
TOOLS = {"tools": "agent_envs:add", "max_turns": 2, "env_isolation": "thread"}
ENVIRONMENT = {"environment": "agent_envs:ThreeTurns", "env_isolation": "thread"}


class TokenDigest:
    """Every sequence HybridActor.run returns, hashed in order (the sampled token streams)."""

    def __init__(self, monkeypatch):
        self.hash, self.sequences = hashlib.sha256(), 0
        run = HybridActor.run

        def recording(actor, *args, **kwargs):
            seqs = run(actor, *args, **kwargs)
            for seq in seqs:
                self.hash.update(json.dumps(list(seq.token_ids)).encode())
            self.sequences += len(seqs)
            return seqs
        monkeypatch.setattr(HybridActor, "run", recording)

    def figures(self) -> dict:
        return {"sequences": self.sequences, "tokens_sha256": self.hash.hexdigest()}


def logged(output_dir) -> list[dict]:
    """The seeded figures of a run's train records."""
    return [{k: v for k, v in sorted(r.items()) if isinstance(v, (int, float))
             and not any(c in k for c in CLOCKS)}
            for r in read_metrics(output_dir) if r["kind"] == "train"]


def rl_config(root, name, rollout=None, iterations=2, **options) -> dict:
    from agent_testing import save_chat_model
    model = root / "chat"
    if not model.exists():
        save_chat_model(model, max_position_embeddings=1024)
    return {"policy": str(model), "output_dir": str(root / name), "seed": 3,
            "reward_fn": "reward_testing:vowel_fraction", **options,
            "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                        "kv_cache_memory": 1 << 22, "max_prompt_length": 40, "temperature": 1.0,
                        **(rollout or {})},
            "ppo": {"minibatch_size": 4},
            "train": {"iterations": iterations, "progress": False, "device": "cpu"}}


def supervised(root, name):
    from train_testing import (demonstrations, rm_config, save_tiny_model,
                               sorted_digit_preferences, sft_config, write_jsonl)
    model = save_tiny_model(root / "tiny")
    train = {"max_steps": 3, "device": "cpu"}
    if name == "sft":
        data = write_jsonl(root / "sft.jsonl", demonstrations(12))
        return run_sft(sft_config(model, data, root / name, train=train)).output_dir
    data = write_jsonl(root / "rm.jsonl", sorted_digit_preferences(12))
    return run_rm(rm_config(model, data, root / name, train=train)).output_dir


def distill(root, name, rollout=None):
    from train_testing import save_tiny_model
    student = save_tiny_model(root / "student")
    teacher = save_tiny_model(root / "teacher", seed=1, hidden_size=96, intermediate_size=160)
    cfg = DistillConfig.from_dict({
        "policy": str(student), "teacher": str(teacher), "output_dir": str(root / name),
        "seed": 3, "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2,
                               "max_new_tokens": 6, "kv_cache_memory": 1 << 22, **(rollout or {})},
        "ppo": {"minibatch_size": 4}, "train": {"iterations": 2, "progress": False,
                                                "device": "cpu"}})
    train_distill(cfg, dataset=datasets.Dataset.from_list(ROWS))
    return root / name


def rl(root, name, stage, rollout=None, **options):
    run = run_ppo if stage == "ppo" else run_grpo
    config = rl_config(root, name, rollout, **options)
    return run(config, dataset=datasets.Dataset.from_list(ROWS)).output_dir


# name -> how it runs (root directory, name) -> its output directory
RUNS = {
    "sft": supervised,
    "rm": supervised,
    "ppo": lambda root, name: rl(root, name, "ppo"),
    "grpo": lambda root, name: rl(root, name, "grpo"),
    "grpo_dynamic_sampling": lambda root, name: rl(
        root, name, "grpo", {"dynamic_sampling": True, "max_sampling_rounds": 2}),
    "grpo_partial": lambda root, name: rl(
        root, name, "grpo", {"partial_rollouts": True, "prompts_per_iteration": 1,
                             "tokens_per_iteration": 14}, iterations=3),
    "grpo_tools": lambda root, name: rl(root, name, "grpo", TOOLS),
    "grpo_environment_partial": lambda root, name: rl(
        root, name, "grpo", {**ENVIRONMENT, "partial_rollouts": True, "prompts_per_iteration": 1,
                             "tokens_per_iteration": 24}, iterations=3),
    "distill": distill,
}


def seeded_run(name, root, monkeypatch) -> dict:
    digest, threads = TokenDigest(monkeypatch), torch.get_num_threads()
    torch.set_num_threads(1)  # one thread's rounding, whatever the machine has
    try:
        with kernels.use_backend("torch"):
            output = RUNS[name](root, name)
    finally:
        torch.set_num_threads(threads)
    return {**digest.figures(), "train": logged(output)}


@pytest.fixture(scope="module")
def record():
    return json.loads(RECORD.read_text())


@pytest.mark.parametrize("name", sorted(RUNS))
def test_a_seeded_run_gives_the_recorded_tokens_and_losses(name, record, tmp_path, monkeypatch):
    if record["torch"] != torch.__version__:
        pytest.skip(f"recorded with torch {record['torch']}, this is {torch.__version__}")
    assert_same_run(seeded_run(name, tmp_path, monkeypatch), record["runs"][name], name)


def assert_same_run(got: dict, recorded: dict, name: str) -> None:
    """The sampled tokens (their count and digest) and every train record's keys exactly; its
    figures within a relative 1e-5 or an absolute 2e-6: two CPUs' torch kernels (their SIMD widths)
    sum a step's reductions in other orders, which moves a norm at the 1e-8 level, a difference of
    fp32 log-probs (a KL, a loss near 0) by their rounding (~1e-7 of log-probs of a few units), and
    never a token.
    The log-prob mismatch figures (the float noise between two forwards, by definition: its count
    of tokens over a threshold among them) are left out."""
    assert (got["sequences"], got["tokens_sha256"]) == (
        recorded["sequences"], recorded["tokens_sha256"]), name
    assert [sorted(r) for r in got["train"]] == [sorted(r) for r in recorded["train"]], name
    for step, (row, want) in enumerate(zip(got["train"], recorded["train"])):
        for key, value in want.items():
            if "mismatch" in key:
                continue
            if isinstance(value, float):
                assert row[key] == pytest.approx(value, rel=1e-5, abs=2e-6), (name, step, key)
            else:
                assert row[key] == value, (name, step, key)


def test_the_record_holds_every_stage_with_tokens_and_losses(record):
    assert sorted(record["runs"]) == sorted(RUNS)
    for name, run in record["runs"].items():
        assert run["train"], name
        assert any("loss" in k and v != 0 for r in run["train"] for k, v in r.items()), name
        if name not in ("sft", "rm"):
            assert run["sequences"] > 0, name


def write_record() -> None:
    """Run every stage and write seeded_record.json (the record this test holds the code to)."""
    sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]
    patch = pytest.MonkeyPatch()
    runs = {}
    for name in sorted(RUNS):
        with tempfile.TemporaryDirectory() as root:
            runs[name] = seeded_run(name, pathlib.Path(root), patch)
        patch.undo()
    text = json.dumps({"torch": torch.__version__, "device": "cpu", "runs": runs}, indent=1)
    RECORD.write_text(text + "\n")


if __name__ == "__main__":
    write_record()

"""SFT and the reward model data-parallel under torchrun (2 CPU ranks over gloo, FSDP2): the final
weights equal one process's with the same global batch and seed (the accumulation is per rank: 2
ranks with the default grad_accum_steps=1 are one process with 2), and checkpoints resume exactly
across world sizes (a sharded one in one process, a one-process one on two ranks)."""

import pytest
import yaml
from safetensors.torch import load_file

from fusedrl.engine.stages.rm import train_rm
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.checkpoint import checkpoint_dir
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_threads, stage_run, torchrun_runs
from train_testing import (checkpoint_data, copy_checkpoint, demonstrations, rm_config, save_tiny_model, sft_config,
                           sorted_digit_preferences, write_jsonl)


def assert_same_curves(run_a, run_b, keys=("loss", "grad_norm")):
    """The per-step loss and gradient norm logged by run_a agree with run_b's at the same steps
    (Adam with clipping would hide a gradient off by a constant factor in the weights; the norm
    shows it)."""
    a, b = ({r["step"]: r for r in read_metrics(run) if r["kind"] == "train"} for run in (run_a, run_b))
    assert a and a.keys() <= b.keys()
    for step, row in a.items():
        for key in keys:
            assert row[key] == pytest.approx(b[step][key], rel=1e-5), (step, key)


def assert_same_weights(dir_a, dir_b, rtol=1e-5):
    a, b = load_file(dir_a / "model.safetensors"), load_file(dir_b / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        x, y = a[name].float(), b[name].float()
        assert (x - y).abs().max() / x.abs().max().clamp_min(1e-12) < rtol, name


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    # Tied embeddings (one FSDP parameter used twice). No k_proj bias: its true gradient is 0
    # (softmax ignores it), so Adam turns pure rounding noise into lr-sized steps.
    return save_tiny_model(tmp_path_factory.mktemp("dp") / "base", arch="llama2", tie_word_embeddings=True)


SFT_LOOP = {"max_steps": 3, "device": "cpu", "precision": "bf16-mixed"}


def sft_run(base_dir, root, name, ranks, **loop):
    """The same global batch of 2 micro-batches on `ranks` ranks; on 2, the default accumulation."""
    optim = {"grad_accum_steps": 2} if ranks == 1 else {}
    return sft_config(base_dir, root / "train.jsonl", root / name, optim=optim, train={**SFT_LOOP, **loop})


RM_OPTIONS = dict(beta_rm=0.1, data={"tokens_per_batch": 128})
RM_LOOP = {"max_steps": 2, "device": "cpu", "precision": "bf16-mixed"}


@pytest.fixture(scope="module")
def sft_runs(base_dir, tmp_path_factory):
    """The module's 2-rank runs in one launch, each beside its one-process run: SFT in bf16-mixed
    (MixedPrecisionAdamW over sharded parameters, its fp32 masters and moments through the
    checkpoints), checkpointing at step 2 (two, one); the one-process run's step-2 checkpoint
    resumed on two ranks (moved); SFT under a token budget in fp32 (budget/); the reward model,
    replicated over the ranks (rm/)."""
    root = tmp_path_factory.mktemp("sft_dp")
    (root / "budget").mkdir()
    (root / "rm").mkdir()
    for run in (root, root / "budget"):
        write_jsonl(run / "train.jsonl", demonstrations(24))
    train_file = write_jsonl(root / "rm" / "pairs.jsonl", sorted_digit_preferences(16))
    with rank_threads():
        train_sft(sft_run(base_dir, root, "one", 1, save_every=2))
        train_sft(sft_run(base_dir, root / "budget", "one", 1, precision="fp32"))
        train_rm(rm_config(base_dir, train_file, root / "rm" / "one", train=RM_LOOP, optim={"grad_accum_steps": 2},
                           **RM_OPTIONS))
    copy_checkpoint(root / "one", 2, root / "moved")
    budget = sft_config(base_dir, root / "budget" / "train.jsonl", root / "budget" / "two",
                        data={"tokens_per_microbatch": 56}, train={**SFT_LOOP, "precision": "fp32"})
    rm = rm_config(base_dir, train_file, root / "rm" / "two", train={**RM_LOOP, "data_parallel": "replicate"},
                   **RM_OPTIONS)
    check(torchrun_runs([stage_run("sft", sft_run(base_dir, root, "two", 2, save_every=2)),
                         stage_run("sft", sft_run(base_dir, root, "moved", 2)),
                         stage_run("sft", budget), stage_run("rm", rm)], root))
    return root


def test_sft_two_ranks_match_one_process(sft_runs):
    assert_same_weights(sft_runs / "two" / "final", sft_runs / "one" / "final")
    assert_same_curves(sft_runs / "two", sft_runs / "one")
    rows = read_metrics(sft_runs / "two")
    assert [r["world_size"] for r in rows if "world_size" in r] == [2]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 3 and all(sum(r["tokens_per_rank"]) == r["tokens"] and len(r["tokens_per_rank"]) == 2
                                        for r in train_rows)
    config_text = (sft_runs / "two" / "config.yaml").read_text()
    assert config_text.endswith("# world_size: 2\n") and yaml.safe_load(config_text)["optim"]["grad_accum_steps"] == 1


def test_sharded_checkpoint_resumes_in_one_process(base_dir, sft_runs):
    """The 2-rank run killed after its step-2 checkpoint, resumed by one process."""
    resumed = sft_runs / "resumed"
    copy_checkpoint(sft_runs / "two", 2, resumed)
    saved = checkpoint_data(checkpoint_dir(resumed, 2))
    assert saved["world_size"] == 2 and (checkpoint_dir(resumed, 2) / "rank-00001.safetensors").is_file()
    assert any(len(entry["chunks"]) == 2 for entry in saved["tensors"].values())  # sharded: a piece per rank
    with rank_threads():
        out = train_sft(sft_run(base_dir, sft_runs, "resumed", 1))
    assert [r["resumed_from"] for r in read_metrics(resumed) if "resumed_from" in r][0].endswith("step-00000002")
    assert_same_weights(out, sft_runs / "one" / "final")


def test_one_process_checkpoint_resumes_on_two_ranks(sft_runs):
    moved = sft_runs / "moved"
    assert_same_weights(moved / "final", sft_runs / "one" / "final")
    assert_same_curves(moved, sft_runs / "one")


def test_token_budget_on_two_ranks_matches_one_process(sft_runs):
    """data.tokens_per_microbatch cuts the ranks' examples into different numbers of forwards (FSDP
    collectives in each): the rank with fewer runs zero-loss ones, and the step stays the global one."""
    # fp32, and 1e-4: another cut sums the gradients in another order (bf16: one ulp apart; fp32:
    # 1e-5 after Adam, which divides rounding noise on near-zero gradients by their size).
    runs = sft_runs / "budget"
    assert_same_weights(runs / "two" / "final", runs / "one" / "final", rtol=1e-4)
    assert_same_curves(runs / "two", runs / "one")
    forwards = [r["forwards_per_rank"] for r in read_metrics(runs / "two") if r["kind"] == "train"]
    assert any(a != b for a, b in forwards), forwards                    # the case under test happened


def test_rm_two_ranks_match_one_process(sft_runs):
    """Replicated over the ranks, in bf16-mixed (an fp32 score head on a bf16 model)."""
    runs = sft_runs / "rm"
    assert_same_weights(runs / "two" / "final", runs / "one" / "final")
    assert_same_curves(runs / "two", runs / "one", keys=("loss", "grad_norm", "accuracy", "lm_nll"))
    offsets = [r["reward_offset"] for run in ("one", "two") for r in read_metrics(runs / run) if "reward_offset" in r]
    assert len(offsets) == 2 and offsets[0] == pytest.approx(offsets[1], rel=1e-5)

"""dist_testing.torchrun_runs: several stage runs in one torchrun launch. A run that follows
others in the same ranks trains exactly as it does in a launch of its own, the same weights bit for
bit and the same logged curve: after another stage on another device mesh (a tensor-parallel
reward model), and after the same run (its mesh made once and used again, a run directory locked
and released)."""
import pytest
import torch
from safetensors.torch import load_file

from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_0_call, stage_run, torchrun_runs
from train_testing import (demonstrations, rm_config, save_tiny_model, sft_config, sorted_digit_preferences,
                           write_jsonl)


LOOP = {"max_steps": 2, "device": "cpu", "precision": "bf16-mixed"}


def write_marker(path):
    """A rank_0_call's visible effect."""
    with open(path, "w") as f:
        f.write("rank 0\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    base = save_tiny_model(root / "base")
    write_jsonl(root / "train.jsonl", demonstrations(16))
    write_jsonl(root / "pairs.jsonl", sorted_digit_preferences(16))

    def sft(name):
        return stage_run("sft", sft_config(base, root / "train.jsonl", root / name, train={**LOOP, "save_every": 1}))
    rm = rm_config(base, root / "pairs.jsonl", root / "rm_t2", beta_rm=0.1, data={"tokens_per_batch": 128},
                   train={**LOOP, "tensor_parallel": 2})
    check(torchrun_runs([stage_run("rm", rm), rank_0_call(write_marker, root / "marker"), sft("first"),
                         sft("second")], root))
    check(torchrun_runs([sft("alone")], root))
    return root


@pytest.mark.parametrize("run", ["first", "second"])
def test_a_run_after_others_in_a_launch_trains_as_it_does_alone(runs, run):
    got, alone = (load_file(runs / name / "final" / "model.safetensors") for name in (run, "alone"))
    assert got.keys() == alone.keys()
    assert all(torch.equal(got[name], alone[name]) for name in alone)
    curves = [[(r["step"], r["loss"], r["grad_norm"], r["tokens"]) for r in read_metrics(runs / name)
               if r["kind"] == "train"] for name in (run, "alone")]
    assert len(curves[0]) == LOOP["max_steps"] and curves[0] == curves[1]


def test_every_step_of_the_launch_ran(runs):
    assert (runs / "rm_t2" / "final" / "model.safetensors").is_file()
    assert (runs / "marker").read_text() == "rank 0\n"

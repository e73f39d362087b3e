"""What a resume trusts in a checkpoint: its loop state (the stage's fields and types, the step its
directory is named by, within the run), its RNG states and its manifest's names are checked, and a
checkpoint that fails is set aside as corrupt like one with a bad tensor file; a run directory that
lost config.yaml resumes only when told to; a data file changed at the same path is announced."""
import json
import random
import shutil

import pytest
import torch

from fusedrl.engine import cli
from fusedrl.engine.runs.durable import MANIFEST, CorruptDirectory, verify_manifest, write_manifest
from fusedrl.engine.errors import UsageError
from fusedrl.engine.stages.rollout.state import PPOState
from fusedrl.engine.train.checkpoint import checkpoint_dir
from fusedrl.engine.train.checkpoint.parts import check_rng_state, rng_state
from fusedrl.engine.train.loop import SkipCount
from fusedrl.engine.train.loop_state import loop_state_check
from fusedrl.engine.train.runlog import read_metrics
from cli_testing import cli_error
from train_testing import demonstrations, sft, write_jsonl


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")


@pytest.fixture(scope="module")
def two_steps(qwen2_dir, tmp_path_factory):
    """An SFT run of 2 steps with a checkpoint at each, and its data file."""
    root = tmp_path_factory.mktemp("two_steps")
    data = write_jsonl(root / "train.jsonl", demonstrations(16))
    with pytest.MonkeyPatch.context() as patch:  # before the function-scoped torch_backend
        patch.setenv("FUSEDRL_BACKEND", "torch")
        assert cli.main(sft(qwen2_dir, data, root / "run")) == 0
    return root


def copied(two_steps, tmp_path):
    shutil.copytree(two_steps, tmp_path, dirs_exist_ok=True)
    return tmp_path / "run", tmp_path / "train.jsonl"


def tamper(checkpoint, edit):
    """Change checkpoint.json with `edit(document)` and seal it again, as an attacker would."""
    path = checkpoint / "checkpoint.json"
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))
    (checkpoint / MANIFEST).unlink()
    write_manifest(checkpoint)


def test_a_tampered_step_is_set_aside_as_corrupt_and_the_previous_checkpoint_used(
        qwen2_dir, two_steps, tmp_path, capsys):
    run, _ = copied(two_steps, tmp_path)
    tamper(checkpoint_dir(run, 2), lambda d: d["loop"].update(step=-1000))
    assert cli.main(sft(qwen2_dir, two_steps / "train.jsonl", run, steps=3)) == 0
    assert "checkpoint step-00000002 is corrupt" in capsys.readouterr().err
    assert (run / "checkpoints" / "corrupt-step-00000002").is_dir()
    resumed = [r for r in read_metrics(run) if r.get("resumed_from")]
    assert resumed[-1]["resumed_from"].endswith("step-00000001")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "corrupt-step-00000002", "step-00000002", "step-00000003"]


def test_loop_state_fields_types_and_step_are_checked(tmp_path):
    path = tmp_path / "step-00000004"
    check = loop_state_check(PPOState(), SkipCount(), total=10)
    good = {"step": 4, "prompts_drawn": 8, "kl_coef": 0.05,
            "moments": {"count": 3, "mean": 0.1, "m2": 0.2}, "ptx": {"epoch": 0, "batch_index": 2},
            "loop": {"skipped_steps": 0, "in_a_row": 0}}
    check(path, good)
    for change, problem in (({"step": -1000}, "step=-1000"),
                            ({"step": "4"}, "step='4', expected an int"),
                            ({"prompts_drawn": True}, "prompts_drawn=True"),
                            ({"kl_coef": float("nan")}, "kl_coef=nan"),
                            ({"ptx": {"epoch": 0.5, "batch_index": 0}}, "ptx.epoch=0.5"),
                            ({"moments": {"mean": "x"}}, "moments.mean='x'"),
                            ({"rogue": 1}, "unknown field 'rogue'"),
                            ({"loop": {"in_a_row": -1}}, "loop.in_a_row=-1"),
                            ({"step": 3}, "step=3 in a checkpoint")):
        with pytest.raises(CorruptDirectory, match=problem.replace("(", r"\(")):
            check(path, {**good, **change})
    with pytest.raises(CorruptDirectory, match="expected a mapping"):
        check(path, [4])
    with pytest.raises(UsageError, match="is at step 4, past this run's 3 steps"):
        loop_state_check(PPOState(), SkipCount(), total=3)(path, good)


def test_rng_states_are_checked():
    tensors, python = rng_state()
    check_rng_state("ckpt", tensors, python)
    for bad_tensors, bad_python, problem in (
            ({"rng.torch": tensors["rng.torch"][:10]}, python, "rng.torch is torch.uint8 \\[10\\]"),
            ({"rng.torch": tensors["rng.torch"].float()}, python, "rng.torch is torch.float32"),
            ({}, python, "no torch RNG state"),
            (tensors, [3, python[1][:5], None], "python's RNG state"),
            (tensors, [3, [-1] * 625, None], "python's RNG state"),
            (tensors, "state", "python's RNG state")):
        with pytest.raises(CorruptDirectory, match=problem):
            check_rng_state("ckpt", bad_tensors, bad_python)
    random.setstate((python[0], tuple(python[1]), python[2]))  # what passes, python takes
    torch.set_rng_state(tensors["rng.torch"])


def test_manifest_names_stay_inside_the_directory(tmp_path):
    (tmp_path / "secret").write_text("outside")
    inside = tmp_path / "ckpt"
    inside.mkdir()
    for name in ("../secret", str(tmp_path / "secret")):
        (inside / MANIFEST).write_text(json.dumps({name: {"size": 7, "sha256": "0" * 64}}))
        with pytest.raises(CorruptDirectory, match="outside"):
            verify_manifest(inside)
    (inside / "link").symlink_to(tmp_path / "secret")
    (inside / MANIFEST).write_text(json.dumps({"link": {"size": 7, "sha256": "0" * 64}}))
    with pytest.raises(CorruptDirectory, match="outside"):
        verify_manifest(inside)
    (inside / MANIFEST).write_text(json.dumps({"a": [1]}))
    with pytest.raises(CorruptDirectory, match="is not {size, sha256}"):
        verify_manifest(inside)


def test_a_run_that_lost_config_yaml_resumes_only_when_told_and_changed_data_is_announced(
        qwen2_dir, two_steps, tmp_path, capsys):
    run, data = copied(two_steps, tmp_path)
    (run / "config.yaml").unlink()
    code, err = cli_error(sft(qwen2_dir, data, run, "seed=5", steps=3), capsys)
    assert (code, err) == (2, f"fusedrl sft: output_dir={run} holds checkpoints but no "
                              "config.yaml: the options they were trained with cannot be "
                              "compared with this run's; put config.yaml back, or pass "
                              "train.resume_without_config=true to resume on this command's "
                              "options\n")
    assert not (run / "checkpoints" / "step-00000003").exists()
    write_jsonl(data, demonstrations(17))  # the data changed at the same path
    assert cli.main(sft(qwen2_dir, data, run, "train.resume_without_config=true", steps=3)) == 0
    notices = [r["notice"] for r in read_metrics(run) if "notice" in r]
    changed = f"data.train_file={data} changed since the run began"
    assert any(n.startswith(changed) for n in notices), notices

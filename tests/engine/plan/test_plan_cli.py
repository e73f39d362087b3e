"""`fusedrl plan` (one-line errors, the table; in-process: cli.main prints what the shell shows),
and the start-up check every stage runs: train.optimizer_offload refused in one process, an unfit
plan refused in one line (on CUDA only)."""
import pytest
import torch

from fusedrl.engine import cli
from fusedrl.engine.plan.check import refuse_unfit
from fusedrl.engine.plan.planner import plan_stage
from fusedrl.engine.plan.report import refusal
from fusedrl.engine.plan.units import format_bytes, parse_bytes
from cli_testing import cli_error
from train_testing import demonstrations, sft_config, write_jsonl


def test_sizes_in_and_out():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("79.5 GiB") == int(79.5 * 2**30)
    assert parse_bytes("8e10") == 8 * 10**10 and parse_bytes("1024") == 1024
    for bad in ("80XB", "-1GB", "0", "GB", ""):
        with pytest.raises(ValueError, match="--gpu-memory="):
            parse_bytes(bad)
    assert (format_bytes(29_540_000_000), format_bytes(5_000_000), format_bytes(0)) == ("29.5 GB", "5.0 MB", "-")


def test_mistakes_are_one_line_usage_errors(tmp_path, capsys):
    for argv, message in [
        (["ppo", f"policy={tmp_path / 'nowhere'}", "--gpus", "8"],
         f"policy={tmp_path / 'nowhere'}: no such directory"),
        (["sft", "model=m", "--gpu-memory", "80XB"], "--gpu-memory='80XB': expected a positive size"),
        (["sft", "model=m", "--gpus", "0"], "--gpus=0: expected at least 1"),
        (["grpo", "policy=m", "--gpus", "8", "lora.rnak=8"],
         "unknown config key 'lora.rnak' (did you mean 'lora.rank'?)")]:
        code, err = cli_error(["plan", *argv], capsys)
        assert code == 2 and err.startswith(f"fusedrl plan: {message}") and err.count("\n") == 1, err


def test_the_table_names_every_phase_and_the_verdict(qwen2_dir, capsys):
    # Overrides after the options are the stage's options too.
    assert cli.main(["plan", "ppo", "--gpus", "2", f"policy={qwen2_dir}", f"reward_model={qwen2_dir}"]) == 0
    out = capsys.readouterr().out
    for word in ("policy:", "reference:", "reward model:", "critic:", "weights", "activations", "peak:", "fits"):
        assert word in out, out
    assert [line.split()[0] for line in out.splitlines()[6:11]] == ["load", "rollout", "scoring", "update", "export"]
    assert cli.main(["plan", "sft", f"model={qwen2_dir}", "--gpu-memory", "1MB"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "no change tried fits" in out


def test_optimizer_offload_in_one_process_is_refused_before_any_model_loads(qwen2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(4))
    code, err = cli_error(["sft", f"model={qwen2_dir}", f"output_dir={tmp_path / 'run'}", f"data.train_file={data}",
                           "train.optimizer_offload=true"], capsys)
    assert (code, err) == (2, "fusedrl sft: train.optimizer_offload=true offloads FSDP2's sharded parameters, "
                              "gradients and optimizer state: run under torchrun (one process keeps them on its "
                              "device)\n")


def test_an_unfit_run_is_refused_in_one_line_on_cuda_only(qwen2_dir, tmp_path):
    cfg = sft_config(qwen2_dir, tmp_path / "train.jsonl", tmp_path / "run")
    plan = plan_stage(cfg, 1, 10**6)
    line = refusal(plan)
    assert not plan.fits and "\n" not in line
    assert line.startswith(f"the memory plan does not fit: {plan.peak_phase} needs")
    assert "train.memory_check=false" in line
    refuse_unfit(cfg, torch.device("cpu"), 1)  # the CPU's memory is not known: no check

"""A real `kill -9` of `fusedrl sft` mid-run, then a rerun: it resumes from the newest checkpoint and
ends byte for byte where an uninterrupted run ends, with one metrics series and no leftovers."""
import os
import signal
import subprocess
import sys
import time

import pytest

from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.train import SFTConfig
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.runlog import read_metrics
from train_testing import demonstrations, save_tiny_model, write_jsonl

STEPS = 8


def overrides(model, data, out):
    return [f"model={model}", f"output_dir={out}", f"data.train_file={data}", "data.max_length=48",
            "data.max_prompt_length=24", "data.tokens_per_batch=128", "data.eval_fraction=0", "optim.lr=3e-3",
            f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_checkpoints=2", "train.progress=false"]


def test_kill_9_then_resume_matches_an_uninterrupted_run_byte_for_byte(tmp_path, monkeypatch):
    # The ops on their torch backend, here and in the child: only the process matters in this test
    # (the kernels are tested elsewhere), and the Triton interpreter would make each step seconds.
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    model = save_tiny_model(tmp_path / "model", "qwen2")
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(24))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_sft(config_io.load(SFTConfig, None, overrides(model, data, straight)))

    proc = subprocess.Popen([sys.executable, "-m", "fusedrl.engine.cli", "sft", *overrides(model, data, killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "step-00000002").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    if (killed / "final").exists():
        pytest.fail("the run had finished: the kill came too late to test a resume")

    train_sft(config_io.load(SFTConfig, None, overrides(model, data, killed)))
    for name in ("model.safetensors", "config.json"):
        assert (killed / "final" / name).read_bytes() == (straight / "final" / name).read_bytes()
    resumed = [r for r in read_metrics(killed) if r["kind"] == "info" and r.get("resumed_from")]
    assert len(resumed) == 1
    assert [r["step"] for r in read_metrics(killed) if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert not [p for p in killed.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]

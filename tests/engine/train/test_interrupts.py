"""SIGTERM and SIGINT during training: the step finishes, a checkpoint is saved at it (with periodic
checkpoints off), the command exits 143 / 130 with one line saying how to resume; the same command
then resumes exactly (its final model equal byte for byte to an uninterrupted run's), and a rerun of
the finished run changes nothing. SFT through a real `fusedrl sft` process writing to a file (also
the plain progress lines of a log); GRPO in this process, its reward function sending the signal."""
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedrl.engine import api, cli, errors
from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import SFTConfig
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.parallel import distributed
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.checkpoint import list_checkpoints
from fusedrl.engine.train.interrupts import StopRequests
from fusedrl.engine.train.runlog import read_metrics
from reward_testing import vowel_fraction
from train_testing import demonstrations, save_tiny_model, write_jsonl

STEPS = 12
NO_PERIODIC_SAVES = ["train.save_every=0", "train.save_every_minutes=0"]


def sft_args(model, data, out, steps=STEPS):
    return ["sft", f"model={model}", f"output_dir={out}", f"data.train_file={data}",
            "data.max_length=48", "data.max_prompt_length=24", "data.tokens_per_batch=128",
            "optim.lr=3e-3", f"train.max_steps={steps}", *NO_PERIODIC_SAVES]


def first_train_record(run_dir, proc, deadline_s=120):
    """Wait until `proc` logged a train record (a step done: a checkpointable point)."""
    deadline = time.monotonic() + deadline_s
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
        assert proc.poll() is None, "the run ended before its first step"
        assert time.monotonic() < deadline, "no step within the deadline"
        time.sleep(0.02)


def snapshot(run_dir):
    """{file: (mtime, bytes)} of a run directory but its lock."""
    return {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.read_bytes())
            for p in run_dir.rglob("*") if p.is_file() and not p.name.startswith(".fusedrl-run")}


@pytest.mark.integration
def test_sigterm_saves_exits_143_and_the_same_command_resumes_exactly(tmp_path, monkeypatch,
                                                                      capsys):
    # The ops on their torch backend: the process is what this test is about (and the interpreted
    # Triton kernels would make each step seconds).
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    model = save_tiny_model(tmp_path / "model", "qwen2")
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(20))
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_sft(config_io.load(SFTConfig, None, sft_args(model, data, straight)[1:]))

    log = tmp_path / "log"  # stdout and stderr in a file, as `fusedrl sft ... > log 2>&1`
    with open(log, "w") as out:
        command = [sys.executable, "-m", "fusedrl.engine.cli", *sft_args(model, data, stopped)]
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        first_train_record(stopped, proc)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, log.read_text()
    text = log.read_text()
    lines = text.splitlines()
    assert "\r" not in text and max(map(len, lines)) < 1000
    progress = [line for line in lines if f"train step 1/{STEPS} loss" in line]  # a plain line
    assert progress and "steps/s" in progress[0], text
    assert any("held out (data.eval_fraction=0.05)" in line for line in lines), text
    assert "SIGTERM received" in text
    (saved,) = list_checkpoints(stopped)  # periodic checkpoints are off: the one the signal saved
    step = int(saved.name.split("-")[1])
    assert lines[-1] == (f"fusedrl sft: stopped by SIGTERM at step {step} of {STEPS}, checkpoint "
                         f"{saved} saved; the same command resumes the run from there")
    assert 1 <= step < STEPS and not (stopped / "final").exists()

    assert cli.main(sft_args(model, data, stopped)) == 0
    err = capsys.readouterr().err
    assert f"resuming from step {step} of {STEPS} (checkpoint {saved})" in err
    assert (stopped / "final" / "model.safetensors").read_bytes() == \
        (straight / "final" / "model.safetensors").read_bytes()
    steps = [r["step"] for r in read_metrics(stopped) if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))

    before = snapshot(stopped)
    assert cli.main([*sft_args(model, data, stopped), "optim.lr=1e-2"]) == 0  # nothing to do
    assert capsys.readouterr().err == (
        f"fusedrl sft: the run in {stopped} is complete (step {STEPS} of {STEPS}, model in "
        f"{stopped / 'final'}); nothing changed (raise its number of steps to train further)\n")
    result = api.run_sft(config_io.load(SFTConfig, None, sft_args(model, data, stopped)[1:]))
    assert result.final_dir == stopped / "final" and result.metrics["step"] == STEPS  # the API too
    assert snapshot(stopped) == before
    assert cli.main(sft_args(model, data, stopped, steps=STEPS + 1)) == 0  # a longer run continues
    assert f"resuming from step {STEPS} of {STEPS + 1}" in capsys.readouterr().err
    assert read_metrics(stopped)[-1]["step"] == STEPS + 1


def grpo_config(root, policy, prompts, name):
    """GRPO whose reward functions run in this process (reward.isolation=thread): the test's own
    function signals the trainer's process."""
    cfg = _grpo_config(root, policy, prompts, name)
    return dataclasses.replace(cfg, reward=dataclasses.replace(cfg.reward, isolation="thread"))


def _grpo_config(root, policy, prompts, name):
    return GRPOConfig(policy=str(policy), prompts_file=str(prompts), output_dir=str(root / name),
                      rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3,
                                            max_new_tokens=6, kv_cache_memory=1 << 22),
                      ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=3, vf_coef=0.0,
                                       kl_loss_coef=0.01),
                      train=LoopConfig(iterations=2, save_every=0, save_every_minutes=0,
                                       progress=False, device="cpu"))


def test_sigint_in_grpo_saves_the_iteration_and_the_resume_is_exact(tmp_path, monkeypatch):
    """Ctrl-C while the first iteration scores its samples: that iteration finishes, is saved, and
    the run stops with exit code 130; resumed, it ends where an uninterrupted run ends."""
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")
    policy = save_tiny_model(tmp_path / "policy")
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": p} for p in ["the quick", "hello", "lazy dog"]])
    train_ppo(grpo_config(tmp_path, policy, prompts, "straight"), reward_fn=vowel_fraction)
    calls = []

    def interrupted_at_the_first_iteration(prompt_texts, responses):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends
        return vowel_fraction(prompt_texts, responses)

    cfg = grpo_config(tmp_path, policy, prompts, "stopped")
    # Python's default_int_handler, or SIG_IGN where the test process started in the background
    # (`pytest ... &`): the loop takes SIGINT over either way.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(errors.Interrupted, match="stopped by SIGINT at step 1 of 2") as stop:
        train_ppo(cfg, reward_fn=interrupted_at_the_first_iteration)
    assert errors.one_line(stop.value)[0] == 130
    assert [p.name for p in list_checkpoints(tmp_path / "stopped")] == ["step-00000001"]
    assert signal.getsignal(signal.SIGINT) is before  # the one before, back
    train_ppo(cfg, reward_fn=vowel_fraction)
    a, b = (load_model(tmp_path / run / "final").state_dict() for run in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    stops = [r for r in read_metrics(tmp_path / "stopped") if r.get("stopped")]
    assert [(r["step"], r["stopped"]) for r in stops] == [(1, "SIGINT")]


def test_a_command_started_with_sigint_ignored_stops_on_it_as_on_ctrl_c(tmp_path, capsys):
    """A shell script's background job (`fusedrl sft ... &`, or nohup) starts with SIGINT ignored:
    `kill -INT` still stops the command, here while it waits to read its config from a FIFO."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)

    def unblock():  # only if the signal was lost: the read then ends and the test fails, not hangs
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    timers = [threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)),
              threading.Timer(20, unblock)]
    try:
        for timer in timers:
            timer.start()
        code = cli.main(["sft", "--config", str(fifo)])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # the process's own, back
    finally:
        signal.signal(signal.SIGINT, before)
        for timer in timers:
            timer.cancel()
    assert (code, capsys.readouterr().err) == (130, "fusedrl sft: interrupted\n")


def test_a_second_ctrl_c_stops_at_once_and_a_repeated_sigterm_changes_nothing(capsys):
    with StopRequests() as stops:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stops.received == signal.SIGTERM and stops.agreed() == signal.SIGTERM
    assert capsys.readouterr().err.count("SIGTERM received") == 1
    with pytest.raises(KeyboardInterrupt):
        with StopRequests() as stops:
            os.kill(os.getpid(), signal.SIGINT)
            assert stops.received == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here, between bytecodes
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_interrupt_exits_128_plus_the_signal_and_is_said_by_rank_0_alone(monkeypatch):
    assert errors.one_line(errors.Interrupted("stopped", signal.SIGTERM)) == (143, "stopped")
    monkeypatch.setenv("RANK", "1")
    assert not errors.should_print(errors.Interrupted("stopped", signal.SIGINT))
    assert errors.should_print(errors.FusedRLError("a failure of this rank"))
    assert json.dumps(errors.one_line(errors.RunComplete("done", "final"))) == '[0, "done"]'


def _rank_stops(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with StopRequests(announce=False) as stops:
        assert stops.agreed() == 0  # no signal anywhere: no rank stops
        if rank == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # a signal reaching one rank alone
            time.sleep(0.5)  # its handler runs here
        assert stops.agreed() == signal.SIGTERM, rank  # both stop at this boundary
    distributed.leave(0)


@pytest.mark.integration
def test_every_rank_stops_at_the_step_boundary_where_any_rank_was_signalled(tmp_path):
    mp.spawn(_rank_stops, args=(str(tmp_path / "init"),), nprocs=2)

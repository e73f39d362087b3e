"""bench/bench_ppo.py runs one PPO iteration per side on a tiny model and reports the same work
for both (TRL's side when trl is installed, as the test extra does). Times are not checked."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench", "bench_ppo.py")


def run_quick(tmp_path, *options, env=None, sides=None):
    """bench_ppo.py --quick with both sides (TRL's when trl is installed) -> (sides, payload)."""
    sides = sides or ["ours"] + (["trl"] if importlib.util.find_spec("trl") else [])
    out = tmp_path / "ppo.json"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--sides", *sides, "--out", str(out), *options],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return sides, json.loads(out.read_text())


def test_quick_run_reports_both_sides(tmp_path):
    sides, payload = run_quick(tmp_path)
    assert payload["meta"]["git_commit"] and payload["meta"]["device"] and payload["algo"] == "ppo"
    shape = payload["shape"]
    for side in sides:
        result = payload["results"][side]
        assert "error" not in result, result
        assert result["iteration_s"] > 0 and result["time_generate"] > 0
        # The phases are timed inside the measured iteration (the second), so they fit in it.
        phases = sum(v for k, v in result.items() if k.startswith("time_"))
        assert phases <= result["iteration_s"]
        # Fixed-length rollouts: both sides did the same work.
        assert result["response_tokens"] == shape["prompts"] * shape["samples"] * shape["new_tokens"]
    if "trl" in sides:
        assert payload["speedup_vs_trl"] > 0


def test_quick_grpo_run_against_trls_grpo_trainer(tmp_path):
    """GRPO, critic-free with the verifiable reward function: groups of 4 on the quick shape, the
    same fixed-length work on both sides, one generation per iteration on TRL's. (Ours off the
    interpreter: the kernels' paths are the PPO test's.)"""
    sides, payload = run_quick(tmp_path, "--algo", "grpo", env=off_the_interpreter())
    shape = payload["shape"]
    assert payload["algo"] == "grpo" and shape["samples"] == 4
    for side in sides:
        result = payload["results"][side]
        assert "error" not in result, result
        assert result["iteration_s"] > 0 and result["response_tokens"] == shape["prompts"] * shape["samples"] * shape["new_tokens"]
    assert "time_reference" in payload["results"]["ours"] and "time_score" in payload["results"]["ours"]
    if "trl" in sides:
        assert payload["results"]["trl"]["generations"] == 2 and payload["speedup_vs_trl"] > 0


def off_the_interpreter() -> dict:
    """The environment without TRITON_INTERPRET: the kernels' paths are the PPO test's, and the
    interpreter would make a side's iteration minutes."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_quick_lora_run_against_full_fine_tuning_and_trl_with_peft(tmp_path):
    """LoRA adapters against full fine-tuning on our side, and TRL with PEFT (ours off the
    interpreter, as the GRPO test)."""
    trl = importlib.util.find_spec("trl") and importlib.util.find_spec("peft")
    sides, payload = run_quick(tmp_path, "--lora", "4", env=off_the_interpreter(),
                               sides=["ours", "ours_lora"] + (["trl_lora"] if trl else []))
    assert payload["lora"] == 4
    shape = payload["shape"]
    for side in sides:
        result = payload["results"][side]
        assert "error" not in result, result
        assert result["response_tokens"] == shape["prompts"] * shape["samples"] * shape["new_tokens"]
    assert payload["speedup_lora_vs_full"] > 0 and "time_reference" in payload["results"]["ours_lora"]
    if trl:
        assert payload["speedup_vs_trl_peft"] > 0


def test_the_reward_reads_token_ids_back_from_text():
    from fusedrl.bench import bench_ppo
    tok = bench_ppo.build_tokenizer(eos_id=2, vocab_size=50)
    text = tok.decode([4, 7, 10, 13])
    assert text == "t4 t7 t10 t13" and tok.encode(text, add_special_tokens=False) == [4, 7, 10, 13]
    assert bench_ppo.even_token_share([""], [text]) == [0.5]


def test_trls_rollout_rows_reach_its_trainer(tmp_path):
    """--trl-rollout-rows sets TRL PPO's local_rollout_forward_batch_size (its rollout's rows per
    generate and forward), and the result names it."""
    if importlib.util.find_spec("trl") is None:
        pytest.skip("trl is not installed")
    _, payload = run_quick(tmp_path, "--trl-rollout-rows", "2", sides=["trl"])
    assert payload["results"]["trl"]["local_rollout_forward_batch_size"] == 2


def test_trls_ppo_side_out_of_memory_runs_again_with_half_the_rollout_rows():
    """run_fitting: TRL's default 64 rows per rollout forward, halved while the side runs out of
    the device's memory, down to the micro-batch's rows; any other side or error is run once."""
    import argparse
    from fusedrl.bench import bench_ppo
    from fusedrl.bench.ppo_common import Shape

    def device_of(gib):
        tried = []

        def run(side, args, dirs):
            rows = args.trl_rollout_rows or 64
            tried.append(rows)
            if rows * 2 > gib:  # this side's memory grows with the rows per forward
                return {"side": side, "error": "torch.OutOfMemoryError: CUDA out of memory."}
            return {"side": side, "iteration_s": 1.0, "local_rollout_forward_batch_size": rows}
        return run, tried

    args = argparse.Namespace(algo="ppo", shape=Shape(32, 4, 128, 256, 4, 16), trl_rollout_rows=0)
    run, tried = device_of(80)
    assert bench_ppo.run_fitting(run, "trl", args, ())["local_rollout_forward_batch_size"] == 32
    assert tried == [64, 32] and args.trl_rollout_rows == 0  # the caller's options untouched
    run, tried = device_of(20)  # not even the micro-batch's 16 rows fit: the last error stands
    assert "OutOfMemoryError" in bench_ppo.run_fitting(run, "trl", args, ())["error"]
    assert tried == [64, 32, 16]
    run, tried = device_of(20)
    assert "error" in bench_ppo.run_fitting(run, "ours", args, ()) and tried == [64]
    run, tried = device_of(20)
    grpo = argparse.Namespace(**{**vars(args), "algo": "grpo"})
    assert "error" in bench_ppo.run_fitting(run, "trl", grpo, ()) and tried == [64]

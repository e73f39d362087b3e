"""bench/profile_steps.py (the GPU visit's profile of decode steps, a training micro-batch and
PPO's two losses, the optimizer step) runs to the end on the tiny shape here and writes the five
summaries with their head and tables; the decode kernels' launch-shape timings (tune_decode.py) and the captured
micro-batch's profile are GPU-only and say so."""
import torch

from fusedrl.bench import profile_steps


def test_quick_profiles_write_the_five_summaries(tmp_path, capsys):
    profile_steps.main(["--out", str(tmp_path), "--quick"])
    assert "tune_decode, train_graph: not run" in capsys.readouterr().out
    assert not (tmp_path / "tune_decode.jsonl").exists()
    assert not (tmp_path / "profile_train_graph.txt").exists()
    decode = (tmp_path / "profile_decode.txt").read_text()
    train = (tmp_path / "profile_train.txt").read_text()
    wide = (tmp_path / "profile_decode_b4.txt").read_text()
    rl_ops = (tmp_path / "profile_rl_ops.txt").read_text()
    optimizer = (tmp_path / "profile_optimizer.txt").read_text()
    assert "optimizer step (FusedAdamW, clipped) over 16 parameter tensors" in optimizer  # 2 layers
    assert "steps profiled: 3" in optimizer and "aten::_fused_adamw_" in optimizer
    assert "decode batch 1, 8 new tokens" in decode and "steps profiled: 8" in decode
    assert "training micro-batch of 64 tokens, called; packed attention padded SDPA" in train
    assert "steps profiled: 3" in train
    assert "decode batch 4, 8 new tokens" in wide and "steps profiled: 8" in wide
    # both losses, forward + backward on the CPU's backend, 20 calls each
    assert "ppo_policy_loss fwd+bwd 8x64 fp32, backend torch (20 calls)" in rl_ops
    assert "ppo_value_loss fwd+bwd 8x64 fp32, backend torch (20 calls)" in rl_ops
    assert rl_ops.count("steps profiled: 20") == 2
    for text in (decode, train, wide, rl_ops, optimizer):
        assert text.startswith("commit ") and "ms per step" in text and "By host time:" in text
    for text in (decode, train, wide):
        assert "aten::mm" in text  # the table lists the GEMMs


def test_the_captured_micro_batch_profile_runs_its_step():
    """Its code path here (no graph on the CPU: the captured step runs eagerly), three steps."""
    text = profile_steps.train_profile(True, torch.device("cpu"), torch.float32, captured=True)
    assert "replayed from a CUDA graph" in text and "steps profiled: 3" in text

"""bench_train_step's two micro-batches do the same work: the captured one (run eagerly on the CPU,
on its padded bucket) leaves the gradients the called one leaves, so the GPU's two rows time one
computation."""
from __future__ import annotations

import torch

from fusedrl.bench import bench_train_step
from fusedrl.bench.shapes import qwen_like

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
             head_dim=8)


def gradients_after(make, tokens: int, seq_len: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = qwen_like(2, torch.float32, "cpu", **SMALL)
    torch.manual_seed(1)  # the same random pack for both
    step = make(model, tokens, seq_len, torch.device("cpu"))
    step()
    step()  # a second call: the called one starts from no gradients, the captured one zeroes them
    return [p.grad.clone() for p in model.parameters()]


def test_the_captured_micro_batch_gives_the_called_ones_gradients():
    called = gradients_after(bench_train_step.micro_batch, 50, 16)  # 16, 16, 16 and 2 tokens
    captured = gradients_after(bench_train_step.captured_micro_batch, 50, 16)
    assert all(g.abs().sum() > 0 for g in called)
    for want, got in zip(called, captured):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

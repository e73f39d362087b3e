"""One training micro-batch's forward + backward, timed: the packed forward, the fused LM head's
log-probs and their backward (no optimizer), Qwen2.5-0.5B shape in bf16 on the GPU (the bar: 1k
tokens <= 15 ms), and the optimizer step (FusedAdamW, clipped) on its parameters. `--quick` runs a
tiny fp32 model on the CPU to check the script itself (its times are not GPU times).

    python bench/bench_train_step.py                 # GPU: 1k, 4k, 16k tokens in sequences of 256
    python bench/bench_train_step.py --quick         # CPU smoke run
"""
from __future__ import annotations

import argparse

import torch

from fusedrl.bench import harness, ranks, timing
from fusedrl.engine.model.lm_head import lm_head_logprobs
from fusedrl.engine.train.fused_adamw import FusedAdamW
from fusedrl.engine.train.optim import clip_and_step
from fusedrl.bench.shapes import qwen_like


def micro_batch(model, tokens: int, seq_len: int, device: torch.device):
    """A callable running one micro-batch of `tokens` random tokens (packed sequences of
    `seq_len`): the packed forward, the fused LM head's log-probs and backward (under torchrun:
    and the gradients' all-reduce)."""
    seq = min(seq_len, tokens)
    ids = torch.randint(10, model.config.vocab_size, (tokens,), device=device)
    labels = torch.roll(ids, -1)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        hidden = model.forward_packed(ids, [seq] * (tokens // seq))
        lm_head_logprobs(hidden, model.lm_head.weight, labels).mean().backward()
        if ranks.several():  # data parallel: the ranks' gradients averaged, as DDP does
            ranks.average_gradients(model.parameters())
    return fwd_bwd


def measure_step(model, optimizer, tokens: int, seq_len: int, device: torch.device,
                 budget_s: float = 5.0) -> dict:
    """Median ms of one micro-batch of `tokens` tokens (packed sequences of `seq_len`): forward,
    the fused LM head's log-probs and backward (under torchrun: and the gradients' all-reduce);
    and of the optimizer step (clipped) after it."""
    loop = timing.measure(micro_batch(model, tokens, seq_len, device), device, min_reps=3,
                          budget_s=budget_s)
    step = timing.measure(lambda: clip_and_step([optimizer], 1.0), device, min_reps=3,
                          budget_s=budget_s * 0.6)
    return {"tokens": tokens, "fwd_bwd_ms": round(loop.median_s * 1e3, 3),
            "optimizer_step_ms": round(step.median_s * 1e3, 3), "timings": (loop, step)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny fp32 model on the CPU")
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="tokens per micro-batch")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per packed sequence")
    p.add_argument("--out", default=None, help="JSON results path")
    args = p.parse_args()
    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    small = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
    model = qwen_like(2 if args.quick else 24, dtype, str(device), **(small if args.quick else {}))
    optimizer = FusedAdamW([p for p in model.parameters()], lr=1e-5)
    rows = []
    for tokens in args.tokens or ([64] if args.quick else [1024, 4096, 16384]):
        step = measure_step(model, optimizer, tokens, args.seq_len, device)
        rows.append({k: v for k, v in step.items() if k != "timings"})
        print(rows[-1], flush=True)
    if args.out:
        harness.write_json(args.out, {**harness.run_metadata(device), "results": rows})


if __name__ == "__main__":
    main()

"""One training micro-batch's forward + backward, timed: the packed forward, the fused LM head's
log-probs and their backward (no optimizer), Qwen2.5-0.5B shape in bf16 on the GPU (the bar: 1k
tokens <= 15 ms), and the optimizer step (FusedAdamW, clipped) on its parameters. On a GPU the same
micro-batch also as one CUDA graph replay (engine/train/captured_micro_batch.py: its bucket holds
the pack plus one filler row a sequence). `--quick` runs a tiny fp32 model on the CPU to check the
script itself (its times are not GPU times).

    python bench/bench_train_step.py                 # GPU: 1k, 4k, 16k tokens in sequences of 256
    python bench/bench_train_step.py --quick         # CPU smoke run
"""
from __future__ import annotations

import argparse

import torch

from fusedrl.bench import harness, ranks, timing
from fusedrl.engine.model.lm_head import lm_head_logprobs
from fusedrl.engine.train.captured_micro_batch import CapturedMicroBatch, Column
from fusedrl.engine.train.fused_adamw import FusedAdamW
from fusedrl.engine.train.optim import clip_and_step
from fusedrl.bench.shapes import qwen_like


def random_pack(model, tokens: int, seq_len: int, device: torch.device):
    """`tokens` random ids in packed sequences of `seq_len` (the last one shorter when it does not
    divide), and their labels (the next id) -> (ids [tokens], seqlens, labels [tokens])."""
    seq = min(seq_len, tokens)
    seqlens = [seq] * (tokens // seq) + ([tokens % seq] if tokens % seq else [])
    ids = torch.randint(10, model.config.vocab_size, (tokens,), device=device)
    return ids, seqlens, torch.roll(ids, -1)


def micro_batch(model, tokens: int, seq_len: int, device: torch.device):
    """A callable running one micro-batch of `tokens` random tokens (packed sequences of
    `seq_len`): the packed forward, the fused LM head's log-probs and backward (under torchrun:
    and the gradients' all-reduce)."""
    ids, seqlens, labels = random_pack(model, tokens, seq_len, device)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        hidden = model.forward_packed(ids, seqlens)
        lm_head_logprobs(hidden, model.lm_head.weight, labels).mean().backward()
        if ranks.several():  # data parallel: the ranks' gradients averaged, as DDP does
            ranks.average_gradients(model.parameters())
    return fwd_bwd


def captured_micro_batch(model, tokens: int, seq_len: int, device: torch.device):
    """micro_batch's work (the same mean log-prob's gradients) as a CapturedMicroBatch's replay,
    the gradients zeroed in place before it (one fill of its flat buffer); captured at its first
    call."""
    ids, seqlens, labels = random_pack(model, tokens, seq_len, device)
    columns = {"labels": labels, "weight": torch.full((tokens,), 1.0 / tokens, device=device)}

    def mean_logprob(hidden, values):
        logp = lm_head_logprobs(hidden, model.lm_head.weight, values["labels"])
        return (logp * values["weight"]).sum()
    step = CapturedMicroBatch(model, mean_logprob, {"labels": Column(torch.int64, 0),
                                                    "weight": Column(torch.float32, 0.0)},
                              tokens, len(seqlens))

    def fwd_bwd():
        step.zero_grad()
        step.run(ids, seqlens, columns)
        if ranks.several():
            ranks.average_gradients(model.parameters())
    return fwd_bwd


def measure_step(model, optimizer, tokens: int, seq_len: int, device: torch.device,
                 budget_s: float = 5.0, captured: bool = False) -> dict:
    """Median ms of one micro-batch of `tokens` tokens (packed sequences of `seq_len`): forward,
    the fused LM head's log-probs and backward (under torchrun: and the gradients' all-reduce),
    called (captured: replayed from a CUDA graph, its capture in the warm-up call); and of the
    optimizer step (clipped) after it."""
    make = captured_micro_batch if captured else micro_batch
    loop = timing.measure(make(model, tokens, seq_len, device), device, min_reps=3,
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
        for captured in (False, True) if device.type == "cuda" else (False,):
            step = measure_step(model, optimizer, tokens, args.seq_len, device, captured=captured)
            rows.append({"captured": captured,
                         **{k: v for k, v in step.items() if k != "timings"}})
            print(rows[-1], flush=True)
    if args.out:
        harness.write_json(args.out, {**harness.run_metadata(device), "results": rows})


if __name__ == "__main__":
    main()

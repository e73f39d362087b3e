"""Run by test_vocab_parallel.py under `torchrun --nproc-per-node 2` (gloo): the vocabulary-parallel
log-prob and entropy of each rank's slice against one process's float64 log-softmax over the whole
vocabulary (values, hidden and weight gradients), without and with a logit bias masking ids at
-inf (whole chunks of rank 0's slice among them), and the bytes each path keeps for its backward
beside the one-process fused op's (`linear_token_logprobs`). Writes OUT/rank-R.pt."""
import sys

import torch
import torch.distributed as dist

from fusedrl.engine.ranks import tensor_parallel_ops
from fusedrl.engine.parallel import distributed
from fusedrl.engine.ranks.tensor_parallel_ops import vocab_parallel_logprobs
from fusedrl.kernels import linear_token_logprobs

ROWS, HIDDEN, VOCAB, TEMPERATURE = 37, 24, 203, 0.7  # an odd vocabulary: slices of 102 and 101 rows
MASKED = [*range(41), *range(199, VOCAB)]  # rank 0's first chunks of 16 rows, and the last ids


def saved_bytes(run, inputs) -> int:
    """(run(), bytes of the tensors autograd keeps for its backward, the inputs' storage aside)."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(kept.values())


def masked(hidden, weight, labels, upstream, start: int, per_rank: int) -> dict:
    """The log-prob and entropy under a bias at -inf on MASKED (labels elsewhere), in chunks of 16
    vocabulary rows, and their gradients, beside the float64 masked log-softmax's."""
    bias = torch.zeros(VOCAB)
    bias[MASKED] = float("-inf")
    labels = torch.where(bias[labels].isinf(), labels % 150 + 41, labels)
    tensor_parallel_ops.CHUNK_BYTES = 4 * ROWS * 16
    h = hidden.clone().requires_grad_()
    w = weight[start:start + per_rank].clone().requires_grad_()
    logp, entropy = vocab_parallel_logprobs(h, w, labels, start, dist.group.WORLD, TEMPERATURE,
                                            True, bias=bias)
    (logp * upstream[0] + entropy * upstream[1]).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    # The masked ids' probabilities are 0: the log-softmax over the others alone.
    kept = torch.tensor([v for v in range(VOCAB) if v not in MASKED])
    logsm = torch.log_softmax(h64 @ w64[kept].T / TEMPERATURE, dim=-1)
    ref_logp = logsm.gather(1, torch.searchsorted(kept, labels)[:, None])[:, 0]
    ref_entropy = -(logsm.exp() * logsm).sum(-1)
    (ref_logp * upstream[0] + ref_entropy * upstream[1]).sum().backward()
    return {"masked_logp": logp.detach(), "ref_masked_logp": ref_logp.detach(),
            "masked_entropy": entropy.detach(), "ref_masked_entropy": ref_entropy.detach(),
            "masked_grad_h": h.grad, "ref_masked_grad_h": h64.grad, "masked_grad_w": w.grad,
            "ref_masked_grad_w": w64.grad[start:start + per_rank]}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(ROWS, HIDDEN, generator=g)
    weight = torch.randn(VOCAB, HIDDEN, generator=g)
    labels = torch.randint(0, VOCAB, (ROWS,), generator=g)
    upstream = torch.randn(2, ROWS, generator=g)
    per_rank = -(-VOCAB // world)
    start = rank * per_rank
    h = hidden.clone().requires_grad_()
    w = weight[start:start + per_rank].clone().requires_grad_()
    def sliced():
        return vocab_parallel_logprobs(h, w, labels, start, dist.group.WORLD, TEMPERATURE, True)
    (logp, entropy), kept = saved_bytes(sliced, (h, w, labels))
    (logp * upstream[0] + entropy * upstream[1]).sum().backward()
    # The one process: float64 log-softmax over the whole vocabulary.
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logsm = torch.log_softmax(h64 @ w64.T / TEMPERATURE, dim=-1)
    ref_logp, ref_entropy = logsm.gather(1, labels[:, None])[:, 0], -(logsm.exp() * logsm).sum(-1)
    (ref_logp * upstream[0] + ref_entropy * upstream[1]).sum().backward()
    fh, fw = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    def fused():
        return linear_token_logprobs(fh, fw, labels, temperature=TEMPERATURE, return_entropy=True)
    _, fused_kept = saved_bytes(fused, (fh, fw, labels))
    torch.save({"logp": logp.detach(), "entropy": entropy.detach(), "ref_logp": ref_logp.detach(),
                "ref_entropy": ref_entropy.detach(), "grad_h": h.grad, "ref_grad_h": h64.grad,
                "grad_w": w.grad, "ref_grad_w": w64.grad[start:start + per_rank], "kept": kept,
                "fused_kept": fused_kept, "rows": ROWS, "slice": w.shape[0],
                **masked(hidden, weight, labels, upstream, start, per_rank)},
               f"{sys.argv[1]}/rank-{rank}.pt")
    distributed.leave(0)

"""One rank of test_context_parallel: the tiny Qwen2 (4 query heads over 2 key/value heads, tied head,
q/k/v biases), each pack's target log-probs and entropies through this rank's shard of it
(context_parallel.shard_logprobs over the gloo world), then one backward of a loss of both; the
weight gradients summed over the ranks. Writes OUT/rank-R.pt."""
import sys

import torch
import torch.distributed as dist

from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.config import ModelConfig
from fusedrl.engine.parallel.context_parallel import ContextParallel, shard_logprobs
from engine_testing import make_hf_model, random_prompts

# Odd lengths, a 1-token row (T = 1: no target), rows crossing the shard boundary; the second pack's
# 15 tokens are padded to 16, the third's 1 token is shard 0's alone (shard 1 all padding).
PACKS = [[7, 1, 12, 4], [5, 1, 9], [1, 2]]


def tiny_model():
    hf = make_hf_model("qwen2")
    model = CausalLM(ModelConfig.from_hf(hf.config))
    model.load_state_dict(hf.state_dict(), strict=False)
    return model


def packs():
    """PackedBatches of PACKS: each row's first 2 tokens (1 of a short one) its prompt, the rest targets."""
    out = []
    for i, lens in enumerate(PACKS):
        rows = random_prompts(lens, seed=i)
        out.append(pack_sequences([(row[:min(2, len(row) - 1) or 1], row[min(2, len(row) - 1) or 1:], True)
                                   for row in rows]))
    return out


def loss_of(logp, entropy):
    """A loss reading every target's log-prob and entropy with its own weight."""
    weights = torch.linspace(0.5, 1.5, logp.shape[0])
    return (logp * weights).sum() + 0.1 * entropy.sum()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = tiny_model()
    cp = ContextParallel(dist.get_world_size(), dist.get_rank(), dist.group.WORLD)
    results = [shard_logprobs(model, packed, cp, temperature=0.7, with_entropy=True) for packed in packs()]
    sum(loss_of(*result) for result in results).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for grad in grads.values():
        dist.all_reduce(grad)
    torch.save({"logp": [r[0].detach() for r in results], "entropy": [r[1].detach() for r in results],
                "grads": grads}, f"{sys.argv[1]}/rank-{dist.get_rank()}.pt")

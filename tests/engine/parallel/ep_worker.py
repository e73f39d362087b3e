"""One rank of test_expert_parallel: the tiny Mixtral with its experts sharded over the gloo world,
a forward + backward over this rank's own pack, once per capacity factor given (0: variable splits);
writes its outputs, gradients and dropped assignments to OUT/rank-R-FACTOR.pt."""
import sys

import torch
import torch.distributed as dist

from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.config import ModelConfig
from fusedrl.engine.parallel import distributed
from fusedrl.engine.parallel.expert_parallel import shard_experts
from fusedrl.engine.model.moe import dropped_assignments, moe_blocks, routing_trace
from engine_testing import random_prompts
from moe_testing import make_moe_model


def tiny_model():
    hf = make_moe_model("mixtral")
    model = CausalLM(ModelConfig.from_hf(hf.config))
    model.load_state_dict(hf.state_dict(), strict=False)  # transformers 5's names are ours in memory
    return model


def pack(rank):
    """Rank r's pack: 2 sequences of different lengths (rank 1's 3 tokens make some experts empty there)."""
    return random_prompts([11, 6] if rank == 0 else [3, 9], seed=10 + rank)


def run(out, factor):
    rank = dist.get_rank()
    model = tiny_model()
    shard_experts(model, capacity_factor=factor)
    prompts = pack(rank)
    with routing_trace(model) as trace:
        hidden = model.forward_packed(torch.tensor(sum(prompts, [])), [len(p) for p in prompts])
    hidden.square().sum().backward()
    blocks = moe_blocks(model)
    torch.save({"hidden": hidden.detach(), "chosen": trace.chosen, "dropped": dropped_assignments(model),
                "grads": {b.layer_idx: (b.experts.gate_up_proj.grad, b.experts.down_proj.grad, b.gate.weight.grad)
                          for b in blocks}}, f"{out}/rank-{rank}-{factor}.pt")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for factor in sys.argv[2:] or ["0"]:
        run(sys.argv[1], float(factor))
    distributed.leave(0)

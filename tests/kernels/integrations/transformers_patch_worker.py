"""A torchrun rank of test_transformers_patch.py's FSDP2 test: a tiny Qwen2 patched by patch_model
and sharded by fully_shard (gloo, CPU); each rank trains on its half of the batch. Rank 0 checks the
loss and every (gathered) gradient against the whole batch through the unpatched model."""
import copy
import os
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.fsdp import fully_shard

from fusedrl.kernels.integrations import patch_model
from fusedrl.engine.parallel import distributed


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same model and batch on every rank
    config = transformers.Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    reference = transformers.Qwen2ForCausalLM(config).float()
    ids = torch.randint(0, 61, (2 * world, 6))
    model = patch_model(copy.deepcopy(reference))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    mine = ids[2 * rank:2 * rank + 2]
    loss = model(mine, labels=mine).loss  # FSDP2 averages the ranks' gradients
    loss.backward()
    want = reference(ids, labels=ids)
    want.loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.testing.assert_close(torch.stack(losses).mean(), want.loss.detach(), rtol=1e-5,
                                   atol=1e-6)
        for name, p in reference.named_parameters():
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)
        print("FSDP2 OK", file=sys.stderr)
    distributed.leave(0)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    main()

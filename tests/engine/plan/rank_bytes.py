"""Run under torchrun by test_plan_ranks.py: one rank's real SFT step on a sharded model (FSDP2 over
gloo), then the bytes this rank holds (its shards of the weights, gradients and optimizer state)
written to OUT/rank<R>.json.  python rank_bytes.py MODEL_DIR OUT"""
import json
import sys
from pathlib import Path

import torch

from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.stages.sft import sft_loss
from fusedrl.engine.parallel import distributed
from fusedrl.engine.train import optim


def local_bytes(tensors) -> int:
    unique = {id(t): t for t in tensors}
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in unique.values())


def main(model_dir: str, out: str) -> None:
    distributed.init_distributed("cpu", 120)
    model = distributed.shard(load_model(model_dir, dtype=torch.bfloat16))
    optimizer = optim.build_optimizer(model, OptimConfig())
    batch = pack_sequences([([10, 11, 12], [20, 21, 22, 23], True), ([13, 14], [24, 25, 26], True)])
    (sft_loss(model, batch, {"tokens": batch.num_targets})[0] * distributed.world_size()).backward()
    optim.clip_and_step([optimizer], 1.0)
    params = list(model.parameters())
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    counts = {"weights": local_bytes(params), "grads": local_bytes(p.grad for p in params if p.grad is not None),
              "optimizer": local_bytes(state)}
    Path(out, f"rank{distributed.rank()}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main(*sys.argv[1:])
    distributed.leave(0)

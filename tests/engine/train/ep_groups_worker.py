"""One rank of test_expert_groups (4 gloo ranks, train.expert_parallel=2): `fusedrl sft`'s stage, then
the exported model loaded back in the training layout (expert groups of 2 ranks, replicated twice),
each rank checking its local experts against the whole model and a forward inside gathered_experts
(each rank alone, a different number of forwards per rank: no collective) against the whole model's,
and reporting the bytes of its weights (the plan's per-GPU weights).

argv: the SFT config (YAML), the output directory (rank 0 writes OUT/report.json)."""
import json
import sys
from pathlib import Path

import torch

from fusedrl.engine.parallel import distributed
from fusedrl.engine.config import io as config_io
from fusedrl.engine.config.train import SFTConfig
from fusedrl.engine.parallel.expert_parallel import gathered_experts
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.moe import moe_blocks
from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.parallel.layout import layout_at_load
from engine_testing import random_prompts


def main(config_path: str, out: Path) -> None:
    torch.set_num_threads(1)
    cfg = config_io.load(SFTConfig, config_path)
    final = train_sft(cfg)
    rank, experts = distributed.rank(), cfg.train.expert_parallel
    dims = ParallelDims.from_train(cfg.train, distributed.world_size(), "cpu")
    model = load_model(final, dtype=torch.float32, shard=layout_at_load("trained", dims))
    whole = load_model(final, dtype=torch.float32)
    local_rows = []
    for block, reference in zip(moe_blocks(model), moe_blocks(whole)):
        local = block.experts.down_proj.to_local()
        group = rank % experts  # this rank's place in its expert group of consecutive ranks
        rows = slice(group * local.shape[0], (group + 1) * local.shape[0])
        assert torch.equal(local, reference.experts.down_proj.detach()[rows]), (rank, block.layer_idx)
        local_rows.append(local.shape[0])
    prompts = random_prompts([5 + rank, 3], seed=rank)
    with torch.no_grad(), distributed.gathered(model), gathered_experts(model):
        for _ in range(rank + 1):  # ranks differ in forwards: a collective inside would never meet
            got = model.forward_packed(torch.tensor(sum(prompts, [])), [len(p) for p in prompts])
    want = whole.forward_packed(torch.tensor(sum(prompts, [])), [len(p) for p in prompts]).detach()
    error = float((got - want).abs().max() / want.abs().max())
    weight_bytes = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters())
    report = distributed.all_gather({"local_rows": local_rows, "gathered_error": error, "weight_bytes": weight_bytes})
    if rank == 0:
        (out / "report.json").write_text(json.dumps(report))
    distributed.leave(0)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))

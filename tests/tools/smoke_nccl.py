"""NCCL on one GPU: the collectives of every multi-rank path, in a 1-rank `cpu:gloo,cuda:nccl`
group (the backend string init_distributed uses on GPUs), where the suite's multi-rank tests need
gloo or two GPUs. Each check prints one line `smoke: NAME ok (...)` or `smoke: NAME FAILED: ...`;
exit 1 on any.

1. tensor_parallel_decode_graphs: the tensor-parallel layout (T=1: every all-reduce a real NCCL
   call) generating through the hybrid actor, its decode steps captured as CUDA graphs with the
   collectives inside: the greedy tokens equal the unsharded model's;
2. expert_all_to_all: expert parallelism's forward over the group (all_to_all_single with the real
   split sizes) equal to the unsharded block, then all_to_all_single with empty splits;
3. fsdp_offload_step: FSDP2 with CPUOffloadPolicy (pinned) on every unit, a forward + backward and
   one FusedAdamW step: finite loss, every parameter moved, the shards still in CPU memory.

    torchrun --standalone --nproc-per-node 1 tests/tools/smoke_nccl.py [--device cpu]   # gpu.sh: smoke

--device cpu runs the same checks over gloo (what the suite can run; no graphs captured).
"""
from __future__ import annotations

import argparse
import copy
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fusedrl.bench.bench_moe_decode import TINY, moe_model  # noqa: E402
from gpucheck.workload import tiny_model  # noqa: E402
from fusedrl.engine.parallel import distributed  # noqa: E402
from fusedrl.engine.parallel.dims import ParallelDims  # noqa: E402
from fusedrl.engine.inference.hybrid_actor import HybridActor  # noqa: E402
from fusedrl.engine.inference.llm import LLM  # noqa: E402
from fusedrl.engine.inference.sampling_params import SamplingParams  # noqa: E402
from fusedrl.engine.parallel.expert_parallel import shard_experts  # noqa: E402
from fusedrl.engine.parallel.tensor_parallel import shard_tensor_parallel  # noqa: E402
from fusedrl.engine.train.fused_adamw import FusedAdamW  # noqa: E402

PROMPTS = [[11, 12, 13, 14, 15], [40, 41, 42], [100, 200, 150, 33, 34, 35, 36, 37, 38]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def tensor_parallel_decode_graphs(device: torch.device) -> str:
    model = tiny_model("Qwen3-0.6B", 256, 4, 2, 64, True, dtype=torch.float32).to(device)
    expected = LLM(copy.deepcopy(model), kv_cache_memory=1 << 22).generate(PROMPTS, GREEDY)
    dims = ParallelDims(tensor=1, device_type=device.type)
    actor = HybridActor(shard_tensor_parallel(model, dims), kv_cache_memory=1 << 22)
    graphs = actor.llm.runner.graphs is not None
    assert graphs == (device.type == "cuda"), f"decode graphs captured: {graphs} on {device}"
    got = actor.llm.generate(PROMPTS, GREEDY)
    tokens = [c.token_ids for o in got for c in o.outputs]
    whole = [c.token_ids for o in expected for c in o.outputs]
    assert tokens == whole, "tensor-parallel tokens differ"
    return f"{len(tokens)} sequences, decode graphs {'captured' if graphs else 'off (cpu)'}"


def expert_all_to_all(device: torch.device) -> str:
    whole = moe_model(TINY, 2, torch.float32, device)
    sharded = copy.deepcopy(whole)
    shard_experts(sharded)
    ids = torch.tensor(sum(PROMPTS, []), device=device)
    seqlens = [len(p) for p in PROMPTS]
    with torch.no_grad():
        expected = whole.forward_packed(ids, seqlens)
        torch.testing.assert_close(sharded.forward_packed(ids, seqlens), expected)
    empty = torch.empty(0, 64, device=device)
    out = torch.empty(0, 64, device=device)
    dist.all_to_all_single(out, empty, [0], [0])
    return "2 MoE layers over the group equal the unsharded model; empty splits exchanged"


def fsdp_offload_step(device: torch.device) -> str:
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    model = tiny_model("Qwen3-0.6B", 256, 4, 2, 64, True, dtype=torch.float32).to(device)
    before = [p.detach().clone() for p in model.parameters()]
    # distributed.shard leaves one process's model alone: the units are sharded here, as it would.
    mesh = ParallelDims(device_type=device.type).sub("data")
    for unit in distributed.shard_units(model):
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda")
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    optimizer = FusedAdamW(model.parameters(), lr=1e-2)
    ids = torch.tensor(sum(PROMPTS, []), device=device)
    loss = model.forward_packed(ids, [len(p) for p in PROMPTS]).square().mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss), f"loss {loss}"
    after = [p.to_local() for p in model.parameters()]
    assert all(p.device.type == "cpu" for p in after), "an offloaded shard left CPU memory"
    trained = sum(p.grad is not None for p in model.parameters())
    moved = sum(not torch.equal(a.to(b.device), b) for a, b in zip(after, before))
    assert moved == trained > 0, f"{trained - moved} of {trained} trained parameters unchanged"
    return f"loss {loss.item():.4f}, {moved} parameters stepped in CPU memory"


CHECKS = (tensor_parallel_decode_graphs, expert_all_to_all, fsdp_offload_step)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (NCCL; the default) or cpu (gloo)")
    args = parser.parse_args(argv)
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    failed = 0
    for check in CHECKS:
        try:
            print(f"smoke: {check.__name__} ok ({check(device)})", flush=True)
        except Exception as error:  # every check runs and says its own line
            failed += 1
            traceback.print_exc()
            print(f"smoke: {check.__name__} FAILED: {type(error).__name__}: {error}", flush=True)
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

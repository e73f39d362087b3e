"""Expert parallelism on 2 gloo ranks equals one process: each rank's outputs are the one process's on
its pack, each rank's expert gradients the one process's over both packs, and the ranks' router
gradients sum to the one process's (what data parallelism's all-reduce adds). With fixed-capacity
buffers large enough (factor = the ranks) the same; with small ones the one process that drops the
same assignments (per source rank and destination rank, the first C rows by expert then token).
Host reads: one per sparse layer with variable splits, one per forward with fixed capacity."""
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fusedrl.engine.parallel.expert_parallel import shard_experts
from fusedrl.engine.model.moe import SparseMoeBlock, moe_blocks
from dist_testing import rank_threads, run_ranks
from ep_worker import pack, tiny_model
from fusedrl.bench.launch_count import LaunchCounter

FACTORS = (0.0, 2.0, 0.75)  # variable splits, capacity for every row (2 ranks), one that drops


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{factor: [rank 0's results, rank 1's]} of one torchrun launch of ep_worker."""
    out = tmp_path_factory.mktemp("ep")
    result = run_ranks(Path(__file__).with_name("ep_worker.py"), out, *FACTORS)
    assert result.returncode == 0, result.stderr[-6000:]
    return {f: [torch.load(out / f"rank-{r}-{f}.pt") for r in range(2)] for f in FACTORS}


@pytest.mark.parametrize("factor", FACTORS[:2])
def test_two_ranks_equal_one_process(ranks, factor):
    assert_match(ranks[factor], capacity=None)
    if factor:
        assert all(int(got["dropped"]) == 0 for got in ranks[factor])
    else:
        assert all(got["dropped"] is None for got in ranks[factor])


def test_small_capacity_drops_as_the_reference(ranks, monkeypatch):
    """C = ceil(0.75 x 17 tokens (rank 0's pack, the larger) x top_k 2 / 2 ranks) = 13 rows a
    buffer: each rank's dropped assignments are counted, and its outputs and gradients are those of
    one process whose router weights the same assignments zero."""
    capacity = math.ceil(0.75 * max(len(sum(pack(r), [])) for r in range(2)) * 2 / 2)
    dropped = assert_match(ranks[0.75], capacity, monkeypatch)
    assert [int(got["dropped"]) for got in ranks[0.75]] == dropped and sum(dropped) > 0


def assert_match(got_ranks, capacity, monkeypatch=None) -> list[int]:
    """Each rank's results against one process (dropping as `capacity` rows a buffer says, over 2
    ranks of 4 experts each); returns each rank's dropped assignments in the one process."""
    dropped = [0, 0]
    if capacity is not None:
        route = SparseMoeBlock.route

        def route_dropping(block, logits):
            ids, weights = route(block, logits)
            keep = kept(ids, capacity, dropped, rank)
            return ids, weights * keep.view_as(weights)
        monkeypatch.setattr(SparseMoeBlock, "route", route_dropping)
    with rank_threads():
        model = tiny_model()
        total = 0
        for rank, got in enumerate(got_ranks):
            prompts = pack(rank)
            hidden = model.forward_packed(torch.tensor(sum(prompts, [])), [len(p) for p in prompts])
            torch.testing.assert_close(got["hidden"], hidden.detach(), atol=1e-4, rtol=0)
            total = total + hidden.square().sum()
        total.backward()
    for block in moe_blocks(model):
        for rank, got in enumerate(got_ranks):
            gate_up, down, _ = got["grads"][block.layer_idx]
            local = slice(4 * rank, 4 * rank + 4)  # 8 experts over 2 ranks
            torch.testing.assert_close(gate_up, block.experts.gate_up_proj.grad[local], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(down, block.experts.down_proj.grad[local], atol=1e-4, rtol=1e-4)
        assert all(got["grads"][block.layer_idx][0].abs().sum() > 0 for got in got_ranks)
        router = sum(got["grads"][block.layer_idx][2] for got in got_ranks)
        torch.testing.assert_close(router, block.gate.weight.grad, atol=1e-4, rtol=1e-4)
    return dropped


def kept(ids, capacity, dropped, rank):
    """[T*k] 1 for the assignments a rank keeps: for each destination rank (experts 4r..4r+3), the
    first `capacity` of its slots ordered by expert, then token; adds the others to dropped[rank]."""
    flat = ids.reshape(-1).tolist()
    keep = torch.zeros(len(flat))
    for dest in range(2):
        slots = sorted((e, s) for s, e in enumerate(flat) if e // 4 == dest)
        for _, slot in slots[:capacity]:
            keep[slot] = 1
        dropped[rank] += max(len(slots) - capacity, 0)
    return keep


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_host_reads_per_forward(tmp_path, factor):
    """Variable splits read each sparse layer's split sizes on the host (`.tolist()`, and the
    counter's repeat_interleave, given its output size), its recompute in backward again; fixed
    capacity reads once a forward (the group's largest forward, `.item()`) and nothing per layer.
    Counted on a 1-rank gloo group by bench/launch_count.py's counter, beyond what the same forward
    and backward read unsharded."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        syncs = []
        for sharded in (False, True):
            model = tiny_model()
            model.set_recompute(True)
            if sharded:
                shard_experts(model, capacity_factor=factor)
            prompts = pack(0)
            with LaunchCounter() as counter:
                hidden = model.forward_packed(torch.tensor(sum(prompts, [])),
                                              [len(p) for p in prompts])
                hidden.square().sum().backward()
            syncs.append(Counter(counter.syncs))
        layers = 2 * len(moe_blocks(model))  # each forward, then recomputed
        added = {"tolist": layers, "repeat_interleave": layers} if factor == 0 else {"item/bool": 1}
        assert syncs[1] - syncs[0] == added, syncs
    finally:
        dist.destroy_process_group()

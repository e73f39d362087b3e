"""Expert parallelism on 2 gloo ranks equals one process: each rank's outputs are the one process's on
its pack, each rank's expert gradients the one process's over both packs, and the ranks' router
gradients sum to the one process's (what data parallelism's all-reduce adds)."""
from pathlib import Path

import torch
import torch.distributed as dist

from fusedrl.engine.parallel.expert_parallel import shard_experts
from fusedrl.engine.model.moe import moe_blocks
from dist_testing import rank_threads, run_ranks
from ep_worker import pack, tiny_model


def test_two_ranks_equal_one_process(tmp_path):
    result = run_ranks(Path(__file__).with_name("ep_worker.py"), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    with rank_threads():
        model = tiny_model()
        total = 0
        for rank, got in enumerate(ranks):
            prompts = pack(rank)
            hidden = model.forward_packed(torch.tensor(sum(prompts, [])), [len(p) for p in prompts])
            torch.testing.assert_close(got["hidden"], hidden.detach(), atol=1e-4, rtol=0)
            total = total + hidden.square().sum()
        total.backward()
    for block in moe_blocks(model):
        for rank, got in enumerate(ranks):
            gate_up, down, _ = got["grads"][block.layer_idx]
            local = slice(4 * rank, 4 * rank + 4)  # 8 experts over 2 ranks
            torch.testing.assert_close(gate_up, block.experts.gate_up_proj.grad[local], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(down, block.experts.down_proj.grad[local], atol=1e-4, rtol=1e-4)
        assert all(got["grads"][block.layer_idx][0].abs().sum() > 0 for got in ranks)
        router = sum(got["grads"][block.layer_idx][2] for got in ranks)
        torch.testing.assert_close(router, block.gate.weight.grad, atol=1e-4, rtol=1e-4)


def test_a_forward_reads_the_host_once_per_sparse_layer(tmp_path, monkeypatch):
    """The split sizes of each sparse layer's all_to_all are host lists: one `.tolist()` a layer and
    no other host read (`.item()`, another `.tolist()`), counted on a 1-rank gloo group."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = tiny_model()
        shard_experts(model)
        prompts, reads = pack(0), []
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda self, _f=original,
                                _n=name: reads.append(_n) or _f(self))
        with torch.no_grad():
            model.forward_packed(torch.tensor(sum(prompts, [])), [len(p) for p in prompts])
        monkeypatch.undo()
        assert reads == ["tolist"] * len(moe_blocks(model)), reads
    finally:
        dist.destroy_process_group()

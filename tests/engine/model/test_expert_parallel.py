"""Expert parallelism on 2 gloo ranks equals one process: each rank's outputs are the one process's on
its pack, each rank's expert gradients the one process's over both packs, and the ranks' router
gradients sum to the one process's (what data parallelism's all-reduce adds)."""
from pathlib import Path

import torch

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

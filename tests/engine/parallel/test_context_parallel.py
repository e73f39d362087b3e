"""Context parallelism's forward (engine/parallel/context_parallel.py) on 2 gloo ranks
(cp_worker.py): every pack's target log-probs and entropies, and the weight gradients summed over the
ranks, equal one process's whole-pack forward in fp32; odd lengths, padded packs, 1-token rows."""
from pathlib import Path

import torch

from fusedrl.engine.model.lm_head import lm_head_logprobs
from fusedrl.engine.parallel.context_parallel import ContextParallel, shard_pack
from cp_worker import loss_of, packs, tiny_model
from dist_testing import rank_threads, run_ranks


def test_two_context_ranks_equal_one_process(tmp_path):
    result = run_ranks(Path(__file__).with_name("cp_worker.py"), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank-{r}.pt") for r in range(2)]
    with rank_threads():
        model = tiny_model()
        total = 0
        for i, packed in enumerate(packs()):
            hidden = model.forward_packed(packed.input_ids, packed.seqlens, packed.positions, packed.cu_seqlens)
            logp, entropy = lm_head_logprobs(hidden.index_select(0, packed.target_rows), model.lm_head.weight,
                                             packed.target_ids, temperature=0.7, with_entropy=True)
            for got in ranks:  # the same whole values on both ranks
                torch.testing.assert_close(got["logp"][i], logp.detach(), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got["entropy"][i], entropy.detach(), atol=1e-5, rtol=1e-5)
            total = total + loss_of(logp, entropy)
        total.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_shard_reads_its_sequences_keys_from_their_start():
    """Rank 1 of 2 over [7, 1, 12, 4] (24 tokens, 12 a shard): the 3rd sequence's last 8 queries over
    its 12 keys, then the 4th's 4 over its own; its targets are those of rows 12..23."""
    packed = packs()[0]
    shard = shard_pack(packed.input_ids, packed.seqlens, packed.positions, packed.target_rows,
                       packed.target_ids, ContextParallel(2, 1, None))
    assert shard.meta.seqlens_q == [8, 4] and shard.meta.seqlens_k == [12, 4]
    assert shard.meta.key_rows.tolist() == list(range(8, 20)) + list(range(20, 24))
    assert shard.positions.tolist() == list(range(4, 12)) + list(range(4))
    local = packed.target_rows[packed.target_rows >= 12] - 12
    assert shard.target_rows.tolist() == local.tolist()
    assert sum(shard.target_counts) == packed.num_targets

"""The tensor-parallel LM head's chunked vocabulary-parallel log-prob and entropy on 2 gloo ranks
(vocab_parallel_worker.py): the one process's float64 values and gradients, without and with a
bias masking ids at -inf (a vision-language model's vision ids), and no [M, V/T] tensor kept for
the backward: at most the one-process fused op's bytes (a few floats a row)."""
from pathlib import Path

import pytest
import torch

from fusedrl.engine.ranks import tensor_parallel_ops
from dist_testing import run_ranks


@pytest.mark.integration
def test_two_ranks_equal_one_process_and_keep_a_few_floats_a_row(tmp_path):
    result = run_ranks(Path(__file__).with_name("vocab_parallel_worker.py"), tmp_path)
    assert result.returncode == 0, result.stderr[-6000:]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank-{rank}.pt")
        names = ("logp", "entropy", "grad_h", "grad_w")
        for name in (*names, *(f"masked_{n}" for n in names)):  # fp32 sums against float64
            torch.testing.assert_close(got[name].double(), got[f"ref_{name}"], atol=1e-4, rtol=1e-4,
                                       msg=name)
        # lse and the expected logit: 2 fp32 a row (the slice's logits: rows x slice x 4)
        kept, fused = got["kept"], got["fused_kept"]
        assert kept <= 2 * 4 * got["rows"] <= fused, (kept, fused)
        assert got["kept"] < got["rows"] * got["slice"] * 4


def test_chunks_bound_the_logits_of_one_chunk(monkeypatch):
    # 16 rows of logits for 10 hidden rows
    monkeypatch.setattr(tensor_parallel_ops, "CHUNK_BYTES", 4 * 10 * 16)
    starts, step = tensor_parallel_ops._chunks(10, 50)
    assert step == 16 and list(starts) == [0, 16, 32, 48]
    assert tensor_parallel_ops._chunks(10 ** 9, 50)[1] == 1
    assert tensor_parallel_ops._chunks(1, 50)[1] == 50

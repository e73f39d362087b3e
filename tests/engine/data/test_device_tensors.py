"""The packed index tensors made on the host (engine/data/device_tensors.py) equal their torch
definitions, an empty pack included."""
import torch

from fusedrl.engine.data.device_tensors import last_rows, packed_cu_seqlens, packed_positions


def test_packed_index_tensors_equal_their_definitions_empty_pack_included():
    for seqlens in ([3, 1, 4], [1], []):
        lengths = torch.tensor(seqlens, dtype=torch.int64)
        ends = torch.cumsum(lengths, 0)
        want_positions = torch.cat([torch.arange(n) for n in seqlens]) if seqlens else \
            torch.zeros(0, dtype=torch.int64)
        assert torch.equal(packed_positions(seqlens, "cpu"), want_positions)
        assert torch.equal(packed_cu_seqlens(seqlens, "cpu"),
                           torch.cat([torch.zeros(1, dtype=torch.int64), ends]).int())
        assert torch.equal(last_rows(seqlens, "cpu"), ends - 1)

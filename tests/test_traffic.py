"""The traffic counter counts known ops exactly, and the decode-step report runs at a tiny shape."""
import torch

import traffic
from traffic_count import TrafficCounter


def test_matmul_view_and_gather_bytes():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    weight, ids = torch.randn(100, 16), torch.tensor([1, 5, 7])
    with TrafficCounter() as counter:
        a.t()                                   # a view: nothing moves
        a @ b                                   # reads both operands, writes [8, 4]
        torch.nn.functional.embedding(ids, weight)  # reads 3 rows (and the ids), not the table
    read, written = counter.bytes["other"]
    assert read == (8 * 16 + 16 * 4) * 4 + (3 * 16 * 4 + 3 * 8)
    assert written == 8 * 4 * 4 + 3 * 16 * 4


def test_host_syncs_are_counted():
    x = torch.arange(4)
    with TrafficCounter() as counter, counter.python_syncs():
        x.sum().item()
        x.tolist()
        bool(x[0])
        x.nonzero()
    assert dict(counter.syncs) == {"item/bool": 2, "tolist": 1, "nonzero": 1}


def test_decode_report_at_a_tiny_shape():
    report = traffic.decode_report(batch=4, layers=1, prompt=5, dtype=torch.float32, vocab_size=64,
                                   hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2,
                                   head_dim=8)
    assert {"embedding", "layer 0", "LM head", "sampler"} <= set(report["regions"])
    assert report["total"]["counted"] >= report["total"]["floor"] > 0
    assert "| layer 0 |" in traffic.table(report)

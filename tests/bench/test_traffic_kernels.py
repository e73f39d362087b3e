"""The in-kernel traffic counter counts each active lane's bytes, re-reads included, and holds the
sampler to at most 3 reads' worth of its logits at top-p 0.9, top-k 50 and on a flat row, in at most
4 launches and one op (bytes, not timings)."""
import os

import pytest
import torch

from fusedrl.kernels.sampling.sampler import sample_triton
from fusedrl.kernels.triton_compat import tl, triton
from traffic_kernels import KernelTraffic
from value_checks import value_checks_as_on_gpu

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="counts the Triton interpreter's loads (TRITON_INTERPRET=1)")


@triton.jit
def _read_twice(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    b = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(a + b))


@needs_interpreter
def test_counts_active_lanes_and_rereads():
    x, out = torch.randn(100), torch.empty(1)
    with KernelTraffic() as t:
        _read_twice[(3,)](x, out, 100, BLOCK=128)
    assert t.launches == {"_read_twice": 1}  # one grid of 3 programs
    assert t.loaded["_read_twice"] == 3 * 2 * 100 * 4  # two reads of 100 fp32, masked lanes free
    assert t.stored["_read_twice"] == 3 * 4


def model_like_logits(batch, vocab=151936, seed=0):
    """bf16 logits with a wide bulk and a few far-ahead tokens, as a trained LM's (bench_sampler's)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g) * 2.5
    logits[:, :64] += 12 * torch.rand(batch, 64, generator=g)
    return logits.to(torch.bfloat16)


BAR_CASES = {"top_k=50": dict(top_k=50), "top_p=0.9": dict(top_p=0.9),
             "flat row, top_p=0.9": dict(top_p=0.9, flat=True)}


def sampling_args(batch, top_k=0, top_p=1.0, min_p=0.0):
    """(temperatures, top_ks, top_ps, seeds, positions, min_ps) of `batch` rows alike."""
    return (torch.ones(batch), torch.full((batch,), top_k), torch.full((batch,), top_p), torch.arange(batch),
            torch.full((batch,), 9), torch.full((batch,), min_p))


@needs_interpreter
@pytest.mark.parametrize("kw", BAR_CASES.values(), ids=BAR_CASES.keys())
def test_sampler_loads_at_most_three_reads_of_its_logits(kw):
    """At most three reads of the logits: the bracket's window takes the few tokens near the cut
    only (a per-row 65536-bin histogram's atomics would cost 4 bytes a token). A flat
    row (every token in the window) stays under the bar too."""
    kw = dict(kw)
    logits = torch.zeros(2, 151936, dtype=torch.bfloat16) if kw.pop("flat", False) else model_like_logits(2)
    one_read = logits.numel() * logits.element_size()
    with KernelTraffic() as t:
        sample_triton(logits, *sampling_args(2, **kw))
    assert sum(t.launches.values()) <= 4, dict(t.launches)
    assert t.total_loaded() <= 3 * one_read, (kw, dict(t.loaded), one_read)


@needs_interpreter
def test_sampler_is_one_op_and_a_warm_call_clears_nothing():
    """Given the caller's workspace (as the model runner keeps one), the sampler is the custom op
    alone (no zeroing op beside it), and inside it runs no fill / zero: the windows are made once and
    emptied by the kernels that use them."""
    from torch.profiler import profile

    from fusedrl.kernels.sampling.sampler import SamplerWorkspace
    from fusedrl.bench.traffic_count import TrafficCounter

    logits = model_like_logits(2, vocab=5000)
    args = sampling_args(2, top_k=50, top_p=0.9)
    workspace = SamplerWorkspace(2, logits.device)
    with value_checks_as_on_gpu(), TrafficCounter() as counter:  # as a GPU calls it
        sample_triton(logits, *args, workspace)
    assert dict(counter.ops) == {"other": 1}
    with value_checks_as_on_gpu(), profile() as prof:
        sample_triton(logits, *args, workspace)
    names = {event.name for event in prof.events()}
    assert not names & {"aten::zeros", "aten::zero_", "aten::fill_", "aten::full"}, names


@needs_interpreter
@pytest.mark.parametrize("vocab, dtype", [(50257, torch.bfloat16), (1031, torch.float32), (1, torch.bfloat16)])
def test_token_logprobs_reads_each_logit_once_and_skips_ignored_rows(vocab, dtype):
    """Forward: every logit of a live row loaded once (the row's unaligned edges and aligned body
    never overlap), plus its label and the label's logit; an ignored row costs its label only.
    Backward: each live logit loaded once more and every gradient stored once."""
    from fusedrl.kernels import token_logprobs, use_backend

    logits = (torch.randn(5, vocab) * 3).to(dtype)
    logits[1, : max(1, vocab // 3)] = float("-inf")
    labels = torch.randint(0, vocab, (5,))
    labels[[0, 3]] = -100
    live, size = 3, logits.element_size()
    with use_backend("triton"), KernelTraffic() as t:
        token_logprobs(logits.requires_grad_(), labels).sum().backward()
    assert t.launches == {"_token_logprobs_fwd_kernel": 1, "_token_logprobs_bwd_kernel": 1}, dict(t.launches)
    label_bytes = 5 * labels.element_size()
    assert t.loaded["_token_logprobs_fwd_kernel"] == label_bytes + live * (vocab + 1) * size
    # backward also reads each row's lse and upstream gradient (fp32)
    assert t.loaded["_token_logprobs_bwd_kernel"] == label_bytes + 5 * 2 * 4 + live * vocab * size
    assert t.stored["_token_logprobs_bwd_kernel"] == 5 * vocab * size

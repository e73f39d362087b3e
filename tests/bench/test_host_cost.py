"""The host cost report's counts, live at tiny shapes on the torch backend: a decode step outside
its graph makes one host sync (the tokens read back), launches its input and log-prob copies only
and no blocking copy to the device; a training micro-batch makes no host sync and no blocking copy
(its positions and sequence bounds are made on the host and sent without waiting)."""
import torch

import host_cost
from value_checks import value_checks_as_on_gpu
from fusedrl.bench.shapes import qwen_like
from fusedrl.engine.data.device_tensors import last_rows, packed_cu_seqlens, packed_positions
from fusedrl.kernels import use_backend
from kernel_testing import needs_interpreter


def test_a_decode_step_outside_its_graph_syncs_once_and_launches_only_its_copies():
    with use_backend("torch"):
        llm = host_cost.decode_engine(3)
        counter = host_cost.HostCounter()
        llm.runner.graphs.replay = counter.outside(llm.runner.graphs.replay)
        with counter:
            llm.step()
    assert dict(counter.syncs) == {"tolist": 1}
    # the inputs' one buffer, the graph's full-width block tables, the kept log-probs
    assert counter.names == ["aten::copy_"] * 3
    assert counter.built == 0 and not counter.copies


def test_a_training_micro_batch_has_no_host_sync_and_no_blocking_copy():
    model = qwen_like(1, torch.float32, "cpu", **host_cost.SMALL)
    run = host_cost.micro_batch(model)  # equal lengths: one SDPA call, as a GPU's varlen one
    # the value-reading label check off, as on a GPU
    with use_backend("torch"), value_checks_as_on_gpu():
        run()  # warm-up: the rotary tables cast once
        with host_cost.HostCounter() as counter:
            run()
    assert sum(counter.syncs.values()) == 0, dict(counter.syncs)
    assert set(counter.copies) <= {"non-blocking"}, dict(counter.copies)


def test_the_host_built_positions_and_bounds_are_the_former_device_ops():
    seqlens = [5, 1, 3, 7]
    starts = torch.tensor([0, 5, 6, 9]).repeat_interleave(torch.tensor(seqlens))
    assert torch.equal(packed_positions(seqlens, "cpu"), torch.arange(16) - starts)
    cu = packed_cu_seqlens(seqlens, "cpu")
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 5, 6, 9, 16]
    last = last_rows(seqlens, "cpu")
    assert last.dtype == torch.int64 and last.tolist() == [4, 5, 8, 15]


@needs_interpreter
def test_launches_are_skipped_only_inside_the_block_and_both_paths_are_timed():
    from fusedrl.kernels import rms_norm
    x, weight = torch.randn(4, 64), torch.randn(64)
    with use_backend("triton"):
        want = rms_norm(x, weight, 1e-6)  # kept alive: no freed buffer holds these values
        with host_cost.launches_skipped():
            skipped = rms_norm(x, weight, 1e-6)
        assert not torch.equal(skipped, want)  # unwritten: an empty buffer, not the norm
        torch.testing.assert_close(rms_norm(x, weight, 1e-6), want, rtol=0, atol=0)
    torch.testing.assert_close(want, rms_norm(x.double(), weight.double(), 1e-6).float())
    timed = host_cost.gpu_path_cpu_ms(1, rounds=1, calls=1)
    assert set(timed) == {"direct", "custom_ops"} and min(timed.values()) > 0

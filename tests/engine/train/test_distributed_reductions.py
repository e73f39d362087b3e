"""engine/distributed.py's reductions on 2 real gloo ranks (torch.multiprocessing): values, the
tensor's own device kept (the collective receives the tensor where it is, never a host copy: no
`cpu` / `tolist` / `item` counted by bench/launch_count.py's counter), the forward counts that
token budgets even out, and the offload policy's round trip (in the same launch)."""
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedrl.engine.parallel import distributed
from fusedrl.bench.launch_count import LaunchCounter


def _rank(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    seen = []  # the device of every tensor a collective received

    def spy(collective):
        def call(*args, **kwargs):
            for arg in args:
                seen.extend(t.device for t in (arg if isinstance(arg, list) else [arg])
                            if isinstance(t, torch.Tensor))
            return collective(*args, **kwargs)
        return call
    originals = dist.all_reduce, dist.all_gather
    dist.all_reduce, dist.all_gather = spy(dist.all_reduce), spy(dist.all_gather)
    x = torch.tensor([rank + 1.0, -2.0 * rank], dtype=torch.float64)    # [2]
    try:
        with LaunchCounter() as counter:
            total, largest = distributed.all_reduce_tensor(x), distributed.all_reduce_tensor(x, "max")
            rows = distributed.gather_rows(x[None])                      # [2 ranks, 2]
    finally:
        dist.all_reduce, dist.all_gather = originals
    assert dict(counter.syncs) == {}, dict(counter.syncs)                # no host copy, no host read
    assert set(seen) == {x.device} and len(seen) == 2 + 2 + 1            # 2 reductions; a gather: 2 parts + its own
    assert total.tolist() == [3.0, -2.0] and largest.tolist() == [2.0, 0.0] and total.dtype == x.dtype
    assert rows.tolist() == [[1.0, 0.0], [2.0, -2.0]] and rows.device == x.device
    assert torch.equal(x, torch.tensor([rank + 1.0, -2.0 * rank], dtype=torch.float64))  # input untouched
    assert distributed.all_reduce_sum({"n": rank + 1, "w": 0.25}) == {"n": 3, "w": 0.5}
    assert (distributed.min_over_ranks(rank + 4), distributed.max_over_ranks(rank + 4)) == (4, 5)
    # A token budget's forward counts: rank 0 cut 1 forward, rank 1 three; rank 0 adds two spares.
    done = [1, 3][rank]
    spares = []
    assert distributed.match_forwards(done, distributed.max_over_ranks(done), lambda: spares.append(1)) == 2 - 2 * rank
    assert len(spares) == 2 - 2 * rank
    _offload_round_trips(rank)
    distributed.leave(0)


def _offload_round_trips(rank: int) -> None:
    """A model sharded with the offload policy (distributed.shard(offload=True): its shards rest in
    CPU memory, copied to the device for each unit's all-gather) holds and computes bit for bit what
    the same model sharded without it does."""
    import copy
    from launches import SMALL
    from fusedrl.bench.shapes import qwen_like
    from fusedrl.engine.data.packing import pack_sequences

    torch.manual_seed(0)
    plain_model = qwen_like(2, torch.float32, "cpu", **SMALL)
    offloaded = distributed.shard(copy.deepcopy(plain_model), offload=True)
    distributed.shard(plain_model)
    packed = pack_sequences([([3 + rank, 5, 7], [9, 11], True), ([2], [4, 6, 8], True)])
    with torch.no_grad():
        outs = [m.forward_packed(packed.input_ids, packed.seqlens, packed.positions, packed.cu_seqlens)
                for m in (plain_model, offloaded)]
    assert torch.equal(*outs)
    for (name, a), b in zip(plain_model.state_dict().items(), offloaded.state_dict().values()):
        assert torch.equal(distributed.whole_value(a), distributed.whole_value(b)), name


def test_reductions_keep_values_and_device_on_two_gloo_ranks(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"),), nprocs=2, join=True)

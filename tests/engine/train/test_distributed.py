"""engine/distributed.py without torchrun (one process: every helper is the identity) and
the even split of a global batch over ranks."""
import pytest
import torch

from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.parallel import distributed
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.parallel.layout import layout
from fusedrl.engine.ranks import world


def test_one_process_is_the_plain_program(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    distributed.init_distributed("cpu", timeout_s=5)
    assert not torch.distributed.is_initialized()
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    model = torch.nn.Linear(3, 2)
    assert distributed.shard(model) is model and type(model) is torch.nn.Linear
    with distributed.gathered(model):
        assert type(model.weight) is torch.nn.Parameter
    assert distributed.all_reduce_sum({"tokens": 3, "nll": 1.5}) == {"tokens": 3, "nll": 1.5}
    assert distributed.all_gather(7) == [7] and distributed.broadcast("x") == "x"
    distributed.reshard(model)  # nothing to reshard
    assert layout(model, "trained", ParallelDims()) is model
    assert type(model.weight) is torch.nn.Parameter


def test_more_local_ranks_than_gpus_is_one_line_naming_both_before_the_group_starts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device",
                        lambda index: pytest.fail(f"set_device({index}) reached"))
    with pytest.raises(ConfigValueError,
                       match=r"starts 2 ranks on this node but 1 GPU\(s\) are visible") as error:
        distributed.init_distributed("cuda", timeout_s=5)
    assert "\n" not in str(error.value) and not torch.distributed.is_initialized()


def test_each_rank_takes_its_own_run_of_the_global_batch(monkeypatch):
    monkeypatch.setattr(world, "world_size", lambda: 2)  # where the data ranks read them
    monkeypatch.setattr(world, "rank", lambda: 1)
    assert distributed.rank_slice(3) == slice(3, 6)  # rank 1 of 2, 3 items per rank: items 3..5 of 6
    assert list(range(7))[distributed.rank_slice(1)] == [1]

"""engine/train/distributed.py without torchrun (one process: every helper is the identity) and
the even split of a global batch over ranks."""
import pytest
import torch

from fusedrl.engine.train import distributed


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
    written = []
    distributed.write_once([model], lambda: written.append(1))
    assert written == [1]


def test_the_global_batch_splits_evenly_or_not_at_all(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert distributed.split_evenly(6, "rollout.prompts_per_iteration") == slice(3, 6)
    assert distributed.share(4, "ppo.minibatch_size") == 2
    with pytest.raises(ValueError, match=r"optim.grad_accum_steps=3 must be a multiple of the number of ranks \(2\)"):
        distributed.split_evenly(3, "optim.grad_accum_steps")

"""ParallelDims: the named dimensions a run's `train` section and world size give, their checks,
and the data sub-mesh of each layout."""
import pytest
import torch.distributed as dist

from fusedrl.engine.config.ppo import LoopConfig
from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.parallel.dims import ParallelDims, device_mesh, sub_mesh

REPLICATE_SHARD = ("replicate", "shard")


def dims(world, local_world=None, **train):
    return ParallelDims.from_train(LoopConfig(**train), world, "cpu", local_world)


def test_data_parallel_modes_name_their_dimensions():
    shard, replicate = dims(8), dims(8, data_parallel="replicate")
    hybrid = dims(8, local_world=4, data_parallel="hybrid")
    assert (shard.data_replicate, shard.data_shard, shard.names()) == (1, 8, (("shard",), (8,)))
    assert (replicate.data_replicate, replicate.data_shard) == (8, 1)
    assert replicate.names() == (REPLICATE_SHARD, (8, 1))
    # One node's ranks shard, the nodes replicate (or groups of train.shard_group_size).
    assert hybrid.names() == (REPLICATE_SHARD, (2, 4))
    assert dims(8, data_parallel="hybrid", shard_group_size=2).names() == (REPLICATE_SHARD, (4, 2))


def test_tensor_and_expert_dimensions():
    sharded = dims(8, tensor_parallel=2)
    copied = dims(8, tensor_parallel=2, data_parallel="replicate")
    assert (sharded.tensor, sharded.data, sharded.data_shard, sharded.context) == (2, 4, 4, 1)
    assert (copied.data_replicate, copied.data_shard) == (4, 1)
    assert sharded.names() == copied.names() == (("data", "tensor"), (4, 2))
    experts = dims(8, expert_parallel=4)
    assert (experts.expert, experts.data_shard) == (4, 8)
    assert experts.names() == (("expert_replica", "expert"), (2, 4))


def test_the_context_dimension():
    d = dims(8, context_parallel=2)
    assert (d.context, d.data, d.data_shard, d.tensor) == (2, 4, 4, 1)
    assert d.names() == (("data", "context"), (4, 2))  # a context group: 2 consecutive ranks
    both = dims(8, context_parallel=2, tensor_parallel=2)
    assert (both.data, both.data_shard, both.context, both.tensor) == (2, 2, 2, 2)
    assert both.names() == (("data", "context", "tensor"), (2, 2, 2))
    with pytest.raises(ValueError, match=r"^train.context_parallel must be >= 1, got 0$"):
        LoopConfig(context_parallel=0)


def test_offloads_and_the_device_ride_along():
    d = dims(4, optimizer_offload=True)
    assert (d.optimizer_offload, d.frozen_offload) == (True, False)
    assert (d.device_type, d.world) == ("cpu", 4)


def test_dimensions_whose_product_is_not_the_world_are_refused():
    with pytest.raises(ValueError, match=r"dimensions 1 x 3 x 1 x 2 .* on 8 ranks"):
        ParallelDims(8, data_shard=3, tensor=2)
    with pytest.raises(ConfigValueError, match=r"^train.shard_group_size=3 with train.data_"):
        dims(8, data_parallel="hybrid", shard_group_size=3)


def test_the_data_sub_mesh_of_each_layout(tmp_path):
    """On a gloo world of one rank, each layout's mesh (sizes 1): FSDP2's data mesh is the whole
    mesh (full shard, HSDP), the data dimension (tensor slices) or, beside experts or context
    groups, the mesh flattened; each sub-mesh one object (the optimizer groups DTensors by mesh)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        for names, data in [(("shard",), ("shard",)), (REPLICATE_SHARD, REPLICATE_SHARD),
                            (("data", "tensor"), ("data",)),
                            (("expert_replica", "expert"), ("data",)),
                            (("data", "context"), ("data_context",)),  # FSDP2 over data x context
                            (("data", "context", "tensor"), ("data_context",))]:
            sizes = (1,) * len(names)
            mesh = sub_mesh("cpu", sizes, names, "data")
            assert mesh.mesh_dim_names == data and mesh is sub_mesh("cpu", sizes, names, "data")
            assert (mesh is device_mesh("cpu", sizes, names)) == (names == data)
        tensor = sub_mesh("cpu", (1, 1), ("data", "tensor"), "tensor")
        assert tensor.mesh_dim_names == ("tensor",)
    finally:
        device_mesh.cache_clear()
        sub_mesh.cache_clear()
        dist.destroy_process_group()

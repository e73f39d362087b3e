"""Run by test_sharded_io.py under torchrun (gloo ranks): sharded load, streamed export and a LoRA
merge on sharded bases, each rank against the whole model it loads alone (one launch, every check).

argv: the models' directory (written by the test), the output directory. Rank 0 writes
OUT/report.json with what the test reads back (per-rank largest shard bytes, the exports' paths).
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fusedrl.engine.parallel import distributed
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.parallel.layout import layout_at_load
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.model.lora import add_lora
from fusedrl.engine.model.reward_model import RewardModel, load_reward_model
from fusedrl.engine.model.value_model import ValueModel, load_value_model, value_model_from_reward_model
from fusedrl.engine.model.weight_map import local_box


def report_bytes(model: nn.Module) -> int:
    """The bytes of every parameter of `model` (a tied one once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_equal(sharded: nn.Module, whole: nn.Module, what: str) -> int:
    """Every parameter of `sharded` (gathered) equals `whole`'s; returns this rank's shard bytes."""
    expected = dict(whole.named_parameters())
    names = [name for name, _ in sharded.named_parameters()]
    assert names == list(expected), f"{what}: {names} != {list(expected)}"
    local_bytes = 0
    for name, param in sharded.named_parameters():
        got = distributed.whole_value(param.detach())
        assert torch.equal(got, expected[name].detach()), f"{what}: {name} differs"
        local_bytes += local_box(param)[0].numel() * param.element_size()
    return local_bytes


class LargestTensor(TorchDispatchMode):
    """The bytes of the largest tensor any op makes inside the block (gathers included)."""
    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def two_d(model: nn.Module) -> None:
    """Shard every matrix Shard(0) x Shard(1) on a 2 x (W/2) mesh (vectors Shard(0) on both): the
    layouts tensor parallelism adds, to check the loader is generic over placements."""
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2, distributed.world_size() // 2))
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            placements = [Shard(0), Shard(1)] if param.dim() == 2 else [Shard(0), Shard(0)]
            setattr(module, name, nn.Parameter(distribute_tensor(param, mesh, placements, src_data_rank=None),
                                                      param.requires_grad))


def main(models: Path, out: Path) -> None:
    distributed.init_distributed("cpu", timeout_s=120)
    world, report = distributed.world_size(), {"local_bytes": {}, "whole_bytes": {}}
    dims = ParallelDims.data_only("shard", distributed.world_size(), "cpu")
    sharder = layout_at_load("trained", dims)

    def record(what, sharded, whole):
        local = check_equal(sharded, whole, what)
        report["local_bytes"][what] = distributed.all_gather(local)
        report["whole_bytes"][what] = report_bytes(whole)

    for arch in ("qwen2", "llama"):  # tied embeddings with q/k/v biases; untied with every bias, odd vocab
        whole = load_model(models / arch)
        sharded = load_model(models / arch, shard=sharder)
        record(arch, sharded, whole)
        assert (sharded.lm_head.weight is sharded.model.embed_tokens.weight) == (arch == "qwen2")
        for name, max_bytes in (("", 5 * 2**30), ("_split", 40_000)):  # one file; several files and an index
            with LargestTensor() as seen:
                save_model(sharded, out / f"{arch}{name}", source_dir=models / arch, max_shard_bytes=max_bytes)
            # The export gathers one parameter at a time: nothing larger than the largest is ever made
            # (give or take the all-gather's padding of uneven shards), a fraction of the model.
            largest = max(p.numel() * p.element_size() for p in whole.parameters())
            assert seen.largest <= 1.05 * largest < report_bytes(whole) / 4, (seen.largest, largest)
        if world % 2 == 0:
            record(f"{arch}_2d", load_model(models / arch, shard=two_d), whole)
        # LoRA on the sharded base: each rank merges into its shards, as the whole model merges.
        cfg = LoRAConfig(rank=4, alpha=8, target_modules="q_proj,v_proj,down_proj")
        for model in (whole, sharded):
            torch.manual_seed(0)
            lora = add_lora(model, cfg)
            for _, _, b in lora.named_targets():
                nn.init.normal_(b)
            distributed.reshard(model)
            lora.merge_()
        record(f"{arch}_merged", sharded, whole)

    rm_dir = models / "rm"
    rm = load_reward_model(rm_dir)
    record("reward_model", load_reward_model(rm_dir, shard=sharder), rm)
    record("critic_from_rm", load_value_model(rm_dir, shard=sharder, start="reward_model"),
           value_model_from_reward_model(rm))
    critic = load_value_model(models / "llama", shard=sharder, start="lm")
    assert not distributed.whole_value(critic.value_head.weight).any()
    save_model(critic, out / "critic")
    record("rm_fresh_head", load_model(models / "llama", model_cls=RewardModel, shard=sharder,
                                       fresh=["score.weight"]),
           load_model(models / "llama", model_cls=RewardModel, fresh=["score.weight"]))
    assert isinstance(critic, ValueModel)
    if distributed.is_main():
        (out / "report.json").write_text(json.dumps(report))
    distributed.leave(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

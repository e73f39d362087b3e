"""What the engine keeps where, today: the facts the plan's phases are built from, each with the
code it reads. A change to one of these behaviours (sharded load, tensor-parallel generation,
streamed export) changes its flag here, and the plan follows."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EngineRules:
    # build_models / run_sft / run_rm: hf_io.load_model(shard=...) shards each model on the meta
    # device and each GPU reads only its shards from the safetensors files (the critic too, from its
    # directory).
    load_whole: bool = False
    # HybridActor.generate runs inside distributed.gathered(policy): the whole policy on every GPU.
    generation_gathers_policy: bool = True
    # hf_io.save_model streams one parameter at a time to rank 0 (model/streamed_save.py): a GPU
    # holds its shards plus the one parameter being gathered, never the whole model.
    export_gathers_model: bool = False
    # A LoRA-adapted model's frozen base (and the critic_lora trunk) is sharded like any frozen
    # model; its adapters and heads are replicated.
    lora_base_whole: bool = False
    # FSDP2 all-gathers the next layer while the current one runs (forward and backward prefetch).
    layers_gathered: int = 2

    def as_dict(self) -> dict:
        return asdict(self)


TODAY = EngineRules()

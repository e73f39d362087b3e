"""What the engine keeps where, today: the facts the plan's phases are built from, each with the code
it reads. A change to one of these behaviours (sharded load, tensor-parallel generation, streamed
export) changes its flag here, and the plan follows."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class EngineRules:
    # build_models / run_sft / run_rm: hf_io.load_model(device=cuda:LOCAL_RANK) fills every model whole
    # on every GPU (the reward model's critic copied from it whole), then distributed.shard cuts them.
    load_whole: bool = True
    # HybridActor.generate runs inside distributed.gathered(policy): the whole policy on every GPU.
    generation_gathers_policy: bool = True
    # distributed.write_once -> gathered: the whole exported model on every GPU while rank 0 writes.
    export_gathers_model: bool = True
    # build_models / supervised.train / adapters: a LoRA-adapted model (and the critic_lora trunk) is not
    # sharded: its frozen base is whole on every GPU; its adapters and heads are replicated.
    lora_base_whole: bool = True
    # FSDP2 all-gathers the next layer while the current one runs (forward and backward prefetch).
    layers_gathered: int = 2

    def as_dict(self) -> dict:
        return asdict(self)


TODAY = EngineRules()

"""How a stage trains with LoRA (the `lora` config section): attach the adapters to the frozen
model, checkpoint them as a PEFT adapter directory (the base weights never change, so the run's
model directory plus the adapters resume the run exactly), and export at the end both the adapters
(`<final>_adapter/`, for `peft.PeftModel.from_pretrained`) and the merged model (`<final>/`, a plain
Hugging Face directory the next stage or transformers loads). The reward model trains its `score`
head in full beside the adapters (PEFT's modules_to_save; the adapters then are a SEQ_CLS
directory). Under torchrun the frozen base is sharded like any frozen model, the adapters (and
heads) are whole on every rank and their gradients averaged over the ranks
(engine/parallel/distributed.py); on a tensor-parallel base the adapters are sliced like the weights
they adapt (engine/model/lora.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..parallel import distributed
from ..config.lora import LoRAConfig
from ..model.hf_io import save_model
from ..model.lora import LoRA, add_lora
from ..model.peft_io import read_adapter_weights, save_adapter
from .checkpoint import SavedModel


def attach(model, cfg: LoRAConfig, heads: Optional[dict] = None) -> Optional[LoRA]:
    """Fresh adapters on `model` (frozen) when cfg.rank > 0, else None (every weight trains).
    heads: {PEFT name: module} trained in full with them (the reward model's {"score":
    rm.score})."""
    return add_lora(model, cfg, heads) if cfg.enabled else None


def saved_adapter(lora: LoRA) -> SavedModel:
    """The adapters as a checkpoint part (an earlier layout's PEFT directory read back into
    `lora`)."""
    return SavedModel(lora, lambda directory: read_adapter_weights(lora, directory))


def adapter_dir(final: Path) -> Path:
    """Where the adapters of the export `final` go: RUN_DIR/final -> RUN_DIR/final_adapter."""
    return final.with_name(f"{final.name}_adapter")


def export(model, lora: Optional[LoRA], final: Path, source_dir: str, save: Callable = save_model,
           reward_offset: Optional[float] = None) -> None:
    """Write `model` to `final` with save(model, final, source_dir=...) (tokenizer files from
    `source_dir`); with adapters, first write them (and a reward model's `reward_offset`) to
    adapter_dir(final), then merge them into the weights in place (the run is over) and write the
    merged model. Collective under torchrun: rank 0 writes the adapters (tensor-parallel ones
    gathered whole first), each rank merges into its own shards of the base, and `save` streams the
    model (hf_io.save_model)."""
    if lora is not None:
        save_adapter(lora, adapter_dir(final), source_dir, reward_offset)
        distributed.reshard(model)  # merge into the shards, not into a gathered copy
        lora.merge_()
    save(model, final, source_dir=source_dir)

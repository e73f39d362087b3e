"""The `lora` section every training stage shares: low-rank adapters on the frozen base weights.

`lora.rank=0` (the default) trains every weight; `lora.rank=16` freezes them and trains adapters on
`lora.target_modules`, named as Hugging Face and PEFT name the projections. Nothing here imports
torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from .fields import check, check_fields, option

# Every projection of attention and MLP in a Llama-family decoder, in PEFT's names.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = option("rank r of the adapters (0 = no adapters: train every weight)", 0)
    alpha: float = option(
        "scale numerator: an adapter adds (alpha / rank) * B @ A to its projection", 16.0)
    dropout: float = option("dropout on the adapters' input while training", 0.0)
    target_modules: str = option("comma-separated projections that get adapters, from "
                                 + ",".join(PROJECTIONS), ",".join(PROJECTIONS))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def targets(self) -> tuple[str, ...]:
        """target_modules as a tuple of projection names, in the order given."""
        return tuple(name.strip() for name in self.target_modules.split(",") if name.strip())

    def __post_init__(self):
        check_fields(self, "lora.")
        check(self.rank >= 0, f"lora.rank must be >= 0, got {self.rank}")
        check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = [name for name in self.targets if name not in PROJECTIONS]
        check(not unknown,
              f"lora.target_modules={self.target_modules!r}: {unknown} not among {PROJECTIONS}")
        check(bool(self.targets), f"lora.target_modules is empty: expected some of {PROJECTIONS}")
        check(len(set(self.targets)) == len(self.targets),
              f"lora.target_modules={self.target_modules!r} names a projection twice")

"""The `moe` section of the training stages: the router's auxiliary losses of mixture-of-experts
models (ignored for dense ones). Names as transformers' and ST-MoE's. Nothing here imports torch."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .fields import check, check_fields, option


@dataclass
class RouterLossConfig:
    router_aux_loss_coef: float = option(
        "weight of the load-balancing loss (Switch / transformers' load_balancing_loss_func: "
        "num_experts x sum over experts of (fraction of routed slots) x (mean router probability), "
        "over every sparse layer's tokens; a sigmoid router's probability: its scores normalized "
        "to sum to 1, as DeepSeek-V3's); 0 = off",
        0.0)
    router_z_loss_coef: float = option(
        "weight of the router z-loss (ST-MoE: mean over tokens and sparse layers "
        "of logsumexp(router logits)^2); 0 = off", 0.0)

    @property
    def enabled(self) -> bool:
        return self.router_aux_loss_coef > 0 or self.router_z_loss_coef > 0

    def __post_init__(self):
        check_fields(self, "moe.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef"):
            value = getattr(self, name)
            check(0 <= value < math.inf, f"moe.{name} must be a finite number >= 0, got {value}")

"""The optimizers of an RL run: the policy's (with the shared value head) and the separate
critic's, clipped and stepped together (`Optimizers`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...train import optim


@dataclass
class Optimizers:
    """The policy's optimizer (and the shared value head's params) and the separate critic's;
    tensor_parallel: the policy's engine/parallel/tensor_parallel.TensorParallel at
    train.tensor_parallel > 1 (every model on the same tensor ranks), else None."""
    policy: torch.optim.Optimizer
    critic: Optional[torch.optim.Optimizer]
    max_grad_norm: float
    tensor_parallel: Optional[object] = None

    def zero_grad(self):
        for o in self.all():
            o.zero_grad(set_to_none=True)

    def all(self) -> list[torch.optim.Optimizer]:
        return [self.policy] + ([self.critic] if self.critic is not None else [])

    def clip_and_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Clip each model's gradients by its own norm and step all, unless a norm or `loss` is not
        finite (decided on the device, see optim.clip_and_step). Returns the norms before clipping
        ([models] fp32, policy first): a non-finite one means the update was skipped.
        Tensor-parallel, the sliced gradients are first averaged over the data groups (FSDP's
        reduction, whose hooks the walk bypasses)."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.average_over_data(p for o in self.all()
                                                   for p in optim.parameters(o))
        norms = optim.clip_and_step(self.all(), self.max_grad_norm, loss)
        # On one device (the policy's adapters on the GPU, an offloaded critic's norm on the CPU).
        return torch.stack([n.to(norms[0].device) for n in norms])

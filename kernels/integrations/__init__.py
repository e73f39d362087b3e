"""Our kernels inside other training stacks (docs/integrations.md).

    FusedLinearGRPOLoss   the GRPO family at Liger's call shape (TRL's loss types)
    FusedLinearPPOLoss    clipped PPO from hidden states, with entropy bonus and KL
    group_advantages_by_uid  GRPO / Dr. GRPO / RLOO advantages over a host's uneven uid groups
    fusedrl.kernels.integrations.trl.FusedGRPOTrainer   TRL's GRPOTrainer on our head and loss
    fusedrl.kernels.integrations.verl.register()        verl's seams: head, policy loss, advantages

Importing this package imports no host library: trl and verl are imported by their submodules,
which only run when asked for.
"""
from .grpo_loss import LOSS_TYPES, FusedLinearGRPOLoss, loss_aggregation
from .ppo_loss import FusedLinearPPOLoss, group_advantages_by_uid

__all__ = ["FusedLinearGRPOLoss", "FusedLinearPPOLoss", "LOSS_TYPES", "group_advantages_by_uid",
           "loss_aggregation"]

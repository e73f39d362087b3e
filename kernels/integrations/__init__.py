"""Our kernels inside other training stacks (docs/integrations.md).

    patch_model, patch_model_type  a transformers model (or a model type's classes) on our kernels
    FusedLinearGRPOLoss   the GRPO family at Liger's call shape (TRL's loss types)
    FusedLinearPPOLoss    clipped PPO from hidden states, with entropy bonus and KL
    FusedLinearJSDLoss, FusedLinearJSD  Liger's two distillation modules (JSD with a hard
                          cross-entropy term; the JSD alone), same constructors and calls
    chunked_divergence_loss  TRL's distillation divergence at its call shape
    group_advantages_by_uid  GRPO / Dr. GRPO / RLOO advantages over a host's uneven uid groups
    ppo_value_loss, gae, masked_whiten  the kernels' own, re-exported: they take a host's masks
    fusedrl.kernels.integrations.trl.FusedGRPOTrainer   TRL's GRPOTrainer on our head and loss
    fusedrl.kernels.integrations.verl.register()        verl's seams: head, policy loss, advantages

Importing this package imports no host library: trl and verl are imported by their submodules,
which only run when asked for.
"""
from ..rl.advantages import gae
from ..rl.ppo_loss import ppo_value_loss
from ..rl.whiten import masked_whiten
from .distill import FusedLinearJSD, FusedLinearJSDLoss, chunked_divergence_loss
from .grpo_loss import LOSS_TYPES, FusedLinearGRPOLoss, loss_weights
from .ppo_loss import FusedLinearPPOLoss, group_advantages_by_uid
from .transformers_patch import (MODEL_TYPES, patch_model, patch_model_type, unpatch_model,
                                 unpatch_model_type)

__all__ = ["FusedLinearGRPOLoss", "FusedLinearJSD", "FusedLinearJSDLoss", "FusedLinearPPOLoss",
           "LOSS_TYPES", "MODEL_TYPES", "chunked_divergence_loss", "gae",
           "group_advantages_by_uid", "loss_weights", "masked_whiten", "patch_model",
           "patch_model_type", "ppo_value_loss", "unpatch_model", "unpatch_model_type"]

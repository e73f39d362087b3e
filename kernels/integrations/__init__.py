"""fusedrl.kernels.integrations: our kernels inside the stacks people already run
(docs/integrations.md). Nothing here imports an optional framework until it is used."""

# --- transformers: patch a model (or a model type's classes) onto our kernels ---
from .transformers_patch import (MODEL_TYPES, patch_model, patch_model_type, unpatch_model,
                                 unpatch_model_type)

__all__ = ["MODEL_TYPES", "patch_model", "patch_model_type", "unpatch_model", "unpatch_model_type"]
# --- end transformers ---

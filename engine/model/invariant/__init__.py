"""The batch-invariant mode (exact on-policy log-probs): see `mode.BatchInvariant`."""
from .mode import BatchInvariant, mask_logits

__all__ = ["BatchInvariant", "mask_logits"]

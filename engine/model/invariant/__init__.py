"""The batch-invariant mode (exact on-policy log-probs): see `mode.BatchInvariant`."""
from .mode import BatchInvariant

__all__ = ["BatchInvariant"]

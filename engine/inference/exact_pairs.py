"""What the engine's batch-invariant (exact) mode cannot run beside, and why (the reasons are
engine/exact_reasons.py's): the engine's own rule over its arguments, torch-free and config-free.
The run configs' table (config/compatibility.py) refuses the rollout options these
arguments come from, before any model loads.
"""
from __future__ import annotations

from .. import exact_reasons
from ..errors import ConfigValueError

# (what LLM's argument is, as the refusal names it) -> why the exact mode cannot run beside it
REASONS = {
    "speculative_tokens": exact_reasons.SPECULATIVE_VERIFY,
    "prefill_chunk": exact_reasons.CHUNKED_PREFILL,
    "a mixture-of-experts model": exact_reasons.mixture_of_experts("record_routing"),
    "tensor parallelism": exact_reasons.TENSOR_PARALLEL,
}


def refuse_beside_exact(exact: bool, *, speculative_tokens: int = 0,
                        prefill_chunk: int | None = None, moe: bool = False,
                        tensor_parallel: bool = False) -> None:
    """ConfigValueError (one line naming both) for the first of these that the exact mode
    (`exact`: LLM's batch_invariant on) would run beside."""
    if not exact:
        return
    beside = {"speculative_tokens": speculative_tokens, "prefill_chunk": prefill_chunk,
              "a mixture-of-experts model": moe, "tensor parallelism": tensor_parallel}
    for name, value in beside.items():
        if value:
            shown = name if isinstance(value, bool) else f"{name}={value!r}"
            raise ConfigValueError(f"batch_invariant=True with {shown}: not supported "
                                   f"({REASONS[name]}); set one of them off")

"""What the engine's batch-invariant (exact) mode cannot run beside, and why: the engine's own
rule over its arguments, torch-free and config-free. The mode reproduces one decode walk bit for
bit (the walk the trainer's old-log-prob forward runs again); each of these runs a forward that
walk is not. The run configs' table (config/compatibility.py) refuses the rollout options these
arguments come from, before any model loads.
"""
from __future__ import annotations

from ..errors import ConfigValueError

# (what LLM's argument is, as the refusal names it) -> why the exact mode cannot run beside it
REASONS = {
    "speculative_tokens": "a speculative verify step is not the decode step that one reproduces",
    "prefill_chunk": "a chunked prefill is not the forward that one reproduces",
    "a mixture-of-experts model": "its expert GEMMs have no batch-invariant mode; "
                                  "record_routing keeps the trainer's experts the sampler's",
    "tensor parallelism": "its fixed reduction order is one device's, not the tensor ranks' "
                          "all-reduces'",
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

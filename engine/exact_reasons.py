"""Why the batch-invariant (exact) mode runs beside none of these, written once: the mode reproduces
one decode walk bit for bit (the walk the trainer's old-log-prob forward runs again), and each of
these runs a forward that walk is not. The run configs' table (engine/config/compatibility.py)
refuses the rollout options with these reasons, and the engine its own arguments
(engine/inference/exact_pairs.py). Torch-free; imports nothing of the engine.
"""

SPECULATIVE_VERIFY = "a speculative verify step is not the decode step that one reproduces"
CHUNKED_PREFILL = "a chunked prefill is not the forward that one reproduces"
TENSOR_PARALLEL = "its fixed reduction order is one device's, not the tensor ranks' all-reduces'"


def mixture_of_experts(routing_option: str) -> str:
    """The reason beside a mixture-of-experts model; `routing_option`: how the caller names the
    option that records the sampler's experts (rollout.routing_replay, record_routing)."""
    return (f"its expert GEMMs have no batch-invariant mode; {routing_option} keeps the trainer's "
            "experts the sampler's")

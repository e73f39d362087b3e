"""The token-level forwards of a PPO iteration over a rollout's one pack (its ids, positions and
sequence boundaries): log-probs and entropies of the policy and the reference, values of the
critic."""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

from ...parallel import distributed
from ...parallel.context_parallel import shard_logprobs, shard_values
from ...data.packing import PackedBatch
from ...data.prefix_sharing import share_prefixes
from ...model.invariant import BatchInvariant
from ...model.lm_head import lm_head_logprobs, sampler_bias
from ...model.moe import replay_of, routing_trace
from ..rollout.models import PPOModels


def response_logprobs(model, packed: PackedBatch, temperature: float, *, with_entropy: bool = False,
                      value_head: torch.nn.Module | None = None,
                      invariant: BatchInvariant | None = None, replay_routing: bool = False,
                      whole: Callable[[], ContextManager] | None = None):
    """One packed forward of a causal LM over the rollout.

    Returns (logp [R, T], entropy [R, T] or None, values [R, T] or None): log-probs of the response
    tokens under softmax(logits / temperature) through the fused LM-head kernel, and when a value
    head sharing the trunk is given, its value at each response token's predicting position.
    invariant: run the forward and head in that batch-invariant mode instead (no autograd needed):
    the log-probs then equal, bit for bit, those of a sampler in the same mode; it reads every row
    whole (a shared prompt too), as the sampler's fixed-order ops do.
    replay_routing: an MoE model routes each token to the experts the pack's `routing` records (the
    sampler's; routing replay), where it has them.
    whole: the context in which the batch-invariant forward reads whole weights (default
    distributed.gathered(model); the hybrid actor's, HybridActor.whole_weights, for the policy).
    """
    cp = model.context_parallel
    # this rank's shard of the pack (no prefix sharing or routing there); the value head reads the
    # shard's hidden states, its values gathered over the group as the log-probs are
    if cp is not None:
        out = shard_logprobs(model, packed, cp, temperature, with_entropy, value_head)
        out = list(out) if isinstance(out, tuple) else [out]
        values = packed.to_grid(out.pop()) if value_head is not None else None
        return (packed.to_grid(out[0]), packed.to_grid(out[1]) if with_entropy else None,
                values)
    if invariant is None:
        layout = share_prefixes(packed)  # rows sharing a prompt read it once (train.prefix_sharing)
        replay = None
        if packed.routing is not None and replay_routing:
            replay = replay_of(model, packed.routing if layout is None else
                               packed.routing.index_select(0, layout.token_index))
        with routing_trace(model, replay=replay) if replay else contextlib.nullcontext():
            hidden, target_rows, _ = model.forward_rows(packed, layout)       # [N', H]
        h = hidden.index_select(0, target_rows)                                # [M, H]
        out = lm_head_logprobs(h, model.lm_head.weight, packed.target_ids, temperature=temperature,
                               with_entropy=with_entropy, bias=sampler_bias(model, h.device))
    else:
        # The mode reads the parameters directly, past FSDP's forward hooks: whole weights while it
        # runs.
        with whole() if whole is not None else distributed.gathered(model):
            hidden = invariant.packed_hidden(model, packed.input_ids, packed.seqlens,
                                             pixel_values=packed.pixel_values,
                                             image_grid_thw=packed.image_grid_thw,
                                             image_counts=packed.image_counts)
            h = hidden.index_select(0, packed.target_rows)
            vision = getattr(model.config, "vision", None)
            out = invariant.head_logprobs(h, model.lm_head.weight, packed.target_ids,
                                          temperature=temperature, with_entropy=with_entropy,
                                          masked=() if vision is None else vision.vision_token_ids)
    logp, entropy = out if with_entropy else (out, None)
    values = None if value_head is None else packed.to_grid(value_head(h).squeeze(-1).float())
    return packed.to_grid(logp), None if entropy is None else packed.to_grid(entropy), values


def policy_forward(models: PPOModels, packed: PackedBatch, temperature: float, with_entropy: bool,
                   exact: bool = False):
    """(logp, entropy or None, values or None when critic-free) [R, T] of the policy and critic
    on a packed rollout; exact: the policy in the actor's batch-invariant mode (rollout.exact)."""
    logp, entropy, values = response_logprobs(models.policy, packed, temperature,
                                              with_entropy=with_entropy,
                                              value_head=models.value_head,
                                              invariant=models.actor.batch_invariant if exact
                                              else None, replay_routing=True,
                                              whole=models.actor.whole_weights)
    if models.critic is not None:
        values = critic_values(models.critic, packed)
    return logp, entropy, values


def critic_values(critic, packed: PackedBatch) -> torch.Tensor:
    """Values [R, T] fp32 of PPO's separate critic (a ValueModel, or LoRACritic's adapters on a
    trunk) on a packed rollout; under context parallelism through this rank's shard of the pack
    (its trunk's context group), gathered over the group as the policy's log-probs are."""
    trunk = getattr(critic, "trunk", critic)
    if trunk.context_parallel is None:
        return critic.response_values(packed)
    return packed.to_grid(shard_values(trunk, critic.value_head, packed, trunk.context_parallel))


def reference_logprobs(models: PPOModels, packed: PackedBatch, temperature: float) -> torch.Tensor:
    """logp [R, T] of the frozen reference on a packed rollout (no gradient); with LoRA, the policy
    with its adapters off."""
    lora = models.lora
    with torch.no_grad(), (lora.disabled() if lora is not None else contextlib.nullcontext()):
        return response_logprobs(models.reference or models.policy, packed, temperature)[0]

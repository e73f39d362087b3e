"""Per-GPU bytes of a stage in each phase, by category: the plan itself.

Phases: load (the models built, before sharding), rollout (generation), scoring (the rollout's
reward, reference, old log-prob and value forwards), update (forward + backward, or the optimizer
step, whichever holds more), export (the final model written). SFT and RM have load, update, export.
Categories: weights (resident: a rank's FSDP2 shards, whole models where not sharded, and with
rollout.persistent_weights the policy's whole generation buffers, kept through training), grads (of
the trained parameters, sharded like them, plus a unit's whole gradients before FSDP reduce-scatters
them, plus the optimizer's transient fp32 copy during the step), optimizer (fp32 masters of non-fp32
parameters and the two AdamW moments, 12 bytes per bf16 parameter: engine/train/fused_adamw.py,
created at the first step and kept), kv_pool (rollout.kv_cache_memory: bytes, a fraction of the GPU,
or auto, the largest that fits beside the rest of every phase holding it; capped by the engine at
max_num_seqs full-length
sequences: kv_pool.py), gathered (whole weights held on top of the shards: FSDP units during a
forward, the whole policy while generating, the exported model), activations (per token budget:
activations.py; the scoring forwards' is rollout.tokens_per_forward). With train.optimizer_offload
under torchrun a trained FSDP model's weight shards, gradients, fp32 step copy and optimizer state
rest in CPU memory (host_optimizer_bytes counts the state); only its gathered units and a unit's
whole gradients before the reduce-scatter come onto the GPU.
"""
from __future__ import annotations

import torch

from ..model.causal_lm import CausalLM
from ..model.reward_model import RewardModel
from ..model.value_model import ValueModel
from .activations import (context_share, forward_activations, rollout_prefill_tokens,
                          shared_prefix_tokens, training_activations, vision_activations)
from .model_bytes import Part, param_bytes, unique_params, unit_bytes
from .setup import Setup
from .kv_pool import PoolFigures, held_in, pool_bytes, pool_figures

PHASES = ("load", "rollout", "scoring", "update", "export")
CATEGORIES = ("weights", "grads", "optimizer", "kv_pool", "gathered", "activations")
# FSDP2 all-gathers the next layer while the current one runs (forward and backward prefetch).
LAYERS_GATHERED = 2


def _params(s: Setup) -> list[tuple[torch.Tensor, Part]]:
    """Every parameter once, with the first part holding it (a head trained with adapters is the
    model's)."""
    def compute():
        seen, out = set(), []
        for part in s.parts:
            for p in unique_params(part.module):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((p, part))
        return out
    return s.once("params", compute)


def _trained(s: Setup, on_gpu: bool = True) -> list[tuple[torch.Tensor, int]]:
    """(parameter, the ranks it is split over) of everything an optimizer steps, each once: those
    whose state rests on the GPU (on_gpu), else those offloaded to CPU memory."""
    def compute():
        owner = {id(p): part for p, part in _params(s)}
        seen, out = set(), []
        for part in s.parts:
            for p in part.trained:
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((p, s.shards(owner[id(p)]), s.offloaded(owner[id(p)])))
        return out
    return [(p, shards) for p, shards, offloaded in s.once("trained", compute)
            if offloaded != on_gpu]


def _units(s: Setup, part: Part) -> tuple[list[int], int]:
    return s.once(("units", id(part.module)), lambda: unit_bytes(part.module, skip=s.experts[1]))


def weight_bytes(s: Setup) -> int:
    """Resident weights on the GPU: every model's local shard, but the offloaded ones."""
    return sum(s.local_numel(p, s.shards(part)) * p.element_size() for p, part in _params(s)
               if not s.offloaded(part))


def grad_bytes(s: Setup) -> int:
    """Gradients in the parameters' dtype, sharded like them."""
    return sum(s.local_numel(p, shards) * p.element_size() for p, shards in _trained(s))


def step_buffer_bytes(s: Setup) -> int:
    """FusedAdamW.gradients: one fp32 copy of every local gradient, during the step."""
    return sum(4 * s.local_numel(p, shards) for p, shards in _trained(s))


def optimizer_bytes(s: Setup, on_gpu: bool = True) -> int:
    """FusedAdamW state: fp32 master (non-fp32 parameters), exp_avg, exp_avg_sq, and a 0-dim fp32
    step; on the GPU, or (on_gpu False) in CPU memory."""
    total = 0
    for p, shards in _trained(s, on_gpu):
        n = s.local_numel(p, shards)
        total += (4 * n if p.dtype != torch.float32 else 0) + 8 * n + 4
    return total


def whole_bytes(part: Part) -> int:
    return sum(param_bytes(p) for p in unique_params(part.module))


def forward_gathered(s: Setup, part: Part) -> int:
    """Weights an FSDP model holds gathered during a forward: its root unit (embeddings, LM head;
    not resharded after forward) and the current and the prefetched layer (their tensor slices at
    train.tensor_parallel > 1: Setup.gathered_share)."""
    if not (share := s.gathered_share(part)):
        return 0
    layers, rest = _units(s, part)
    return (rest + LAYERS_GATHERED * max(layers, default=0)) // share


def pool_phases(s: Setup) -> tuple[str, ...]:
    """The phases that hold the KV pool (kv_pool.held_in): rollout.release_kv_pool frees it outside
    the rollout where no CUDA graph holds it: under torchrun gathering by unshard (graphs off);
    where decode steps are CUDA graphs (one process, tensor slices copied across the data groups,
    rollout.persistent_weights) the pool stays."""
    copies = s.job.train.tensor_parallel > 1 and not s.data_sharded(_policy(s))
    graphs = s.ranks == 1 or copies or s.job.persistent_weights
    return held_in(s.cfg, s.ranks, graphs)


def kv_pool(s: Setup, phases: dict) -> PoolFigures:
    """The paged KV pool of HybridActor beside `phases` (the pool left out): kv_pool.pool_bytes;
    with tensor parallelism a GPU holds its key/value heads' share of every block (so T times the
    blocks)."""
    c, t = _policy(s).config, s.job.train.tensor_parallel
    nbytes = pool_bytes(s.cfg, c, s.dtype, t, s.gpu_memory, phases, pool_phases(s))
    return pool_figures(s.cfg, c, s.dtype, t, nbytes)


def _policy(s: Setup) -> Part:
    return next(p for p in s.parts if p.role in ("policy", "model"))


def _role(s: Setup, *roles: str) -> list[Part]:
    return [p for p in s.parts if p.role in roles]


def _critic_decoder(s: Setup) -> Part | None:
    """The decoder the critic's forward runs: its own (a ValueModel), or with critic_lora the trunk
    its adapters hook (the reward model's, else a frozen copy of the policy); None without a critic
    or with the shared value head (the policy's forward)."""
    if _role(s, "critic"):
        return _role(s, "critic")[0]
    if _role(s, "critic adapters"):
        return (_role(s, "critic trunk") or _role(s, "reward model"))[0]
    return None


def _has_lm_head(s: Setup, part: Part) -> bool:
    """Its forward ends in the LM head's log-probs: the policy and reference, the reward model only
    with its LM term (beta_rm); the critics end in a value head."""
    if isinstance(part.module, RewardModel):
        return s.stage == "rm" and s.cfg.beta_rm > 0
    return (isinstance(part.module, CausalLM) and not isinstance(part.module, ValueModel)
            and part.role != "critic trunk")


def _elem(s: Setup) -> int:
    return torch.empty((), dtype=s.dtype).element_size()


def persistent_bytes(s: Setup) -> int:
    """rollout.persistent_weights: the policy's whole-size generation buffers, allocated with the
    hybrid actor and kept (parallel/persistent_weights.py): its whole weights (its tensor slices at
    train.tensor_parallel > 1), but where its local shards are whole on the GPU already
    (data_parallel=replicate, not offloaded), read as they are."""
    policy = _policy(s)
    if (not s.job.persistent_weights
        or not s.fsdp(policy)):
        return 0
    if s.job.train.tensor_parallel > 1:
        return s.slice_bytes(policy) if s.data_sharded(policy) else 0
    return whole_bytes(policy) if s.shards(policy) > 1 or s.offloaded(policy) else 0


def teacher_head_bytes(s: Setup) -> int:
    """distill: the teacher's LM head, gathered whole on each rank once it loads ([V, Ht]:
    engine/stages/distill/teacher.py) where the teacher is sharded or sliced; one process reads the
    head as it is."""
    teacher = next((part for part in s.parts if part.role == "teacher"), None)
    if teacher is None or s.ranks == 1:
        return 0
    return teacher.config.vocab_size * teacher.config.hidden_size * _elem(s)


def _resident(s: Setup) -> dict:
    """What every phase after load holds: the weights (the persistent generation buffers and a
    distilling run's whole teacher head among them) and (kept from the first step on) the
    optimizer."""
    return {"weights": weight_bytes(s) + persistent_bytes(s) + teacher_head_bytes(s),
            "optimizer": optimizer_bytes(s)}


def load_phase(s: Setup) -> dict:
    """Each GPU reads only its shards from the safetensors files (hf_io.load_model(shard=...))."""
    return {"weights": weight_bytes(s)}


def update_phase(s: Setup, tokens: int, trained_decoders: list[Part],
                 shared_keys: float = 0.0) -> dict:
    """The larger of the backward (activations of every trained decoder's graph at once, their
    FSDP roots and layers gathered, a unit's whole gradients) and the step (the fp32 gradient copy;
    with train.cuda_graphs the activations too, held by the graphs' pool).
    shared_keys: keys gathered per token by prefix sharing; at C > 1 a context rank's
    (context_share)."""
    tokens, shared_keys = context_share(s.job.train.context_parallel, tokens, shared_keys)
    elem, ckpt = _elem(s), s.job.train.checkpointing()
    offload = s.job.train.activation_offload
    grads = grad_bytes(s)
    unsharded_grads = 0
    gathered = 0
    for part in trained_decoders:
        if share := s.gathered_share(part):
            layers, rest = _units(s, part)
            gathered += forward_gathered(s, part)
            unsharded_grads = max(unsharded_grads, (rest + max(layers, default=0)) // share)
    backward = {**_resident(s), "grads": grads + unsharded_grads, "gathered": gathered,
                "activations": sum(training_activations(
                    p.config, elem, ckpt, tokens, lm_head=_has_lm_head(s, p), offload=offload,
                    shared_keys=shared_keys, fused=s.fused) + vision_activations(
                    p.config, elem, tokens, s.job.train.train_vision)
                    for p in trained_decoders)}
    step = {**_resident(s), "grads": grads + step_buffer_bytes(s)}
    if getattr(s.job.train, "cuda_graphs", False):
        # Replayed from CUDA graphs (engine/train/captured_forwards.py): the activations stay in
        # the graphs' memory pool, which the step's own buffers cannot take.
        step["activations"] = backward["activations"]
    return max(backward, step, key=lambda d: sum(d.values()))


def export_gathered(s: Setup, parts: list[Part]) -> int:
    """What an export gathers whole on a rank, the models one at a time: its largest parameter
    (model/streamed_save.py streams them one at a time to rank 0)."""
    return max(
        (param_bytes(p) for part in parts if s.fsdp(part) for p in unique_params(part.module)),
        default=0)


def supervised_phases(s: Setup) -> dict:
    d = s.cfg.data
    tokens = d.tokens_per_microbatch or d.tokens_per_batch
    model = _policy(s)
    # SFT/RM zero the gradients at the start of a step: the last step's are still held at export.
    export = {**_resident(s), "grads": grad_bytes(s), "gathered": export_gathered(s, [model])}
    return {"load": load_phase(s), "update": update_phase(s, tokens, [model]), "export": export}


def generation_gathered(s: Setup, policy: Part) -> int:
    """Weights generation holds on top of the policy's shards (engine/parallel/tensor_parallel.py):
    at train.tensor_parallel T > 1 its tensor slices (1/T of the policy) gathered from the data
    group when sharded there (Setup.data_sharded), else none (the data groups hold copies: each GPU
    reads its slices where they lie); at T = 1 the whole policy (HybridActor.run runs inside
    distributed.gathered(policy)),
    unless it is read from the persistent buffers (rollout.persistent_weights: counted with the
    weights, persistent_bytes)."""
    t = s.job.train.tensor_parallel
    if not s.fsdp(policy) or s.job.persistent_weights:
        return 0
    if t > 1:
        return s.slice_bytes(policy) if s.data_sharded(policy) else 0
    return whole_bytes(policy)


def ppo_phases(s: Setup) -> dict:
    r, p = s.cfg.rollout, s.cfg.ppo
    rows = r.prompts_per_iteration * r.samples_per_prompt
    longest = r.max_prompt_length + r.max_new_tokens
    policy = _policy(s)
    elem = _elem(s)
    base = _resident(s)  # the KV pool: added by plan_phases where it is held

    gathered = generation_gathered(s, policy)
    c = policy.config
    prefill = rollout_prefill_tokens(r, c.max_model_len)
    # fp32 logits of a decode step and the sampler's work copy
    sampler_logits = 2 * 4 * r.max_rows * c.vocab_size
    rollout = {**base, "gathered": gathered,
               "activations": forward_activations(c, elem, prefill, lm_head=False) + sampler_logits
               + vision_activations(c, elem, prefill, trained=False)}

    # train.prefix_sharing: a forward reads each group's prompt once, gathers its keys per answer.
    sharing = s.job.train.shares_prefixes
    forwarded, shared_keys = shared_prefix_tokens(rows, r.samples_per_prompt, r.max_prompt_length,
                                                  r.max_new_tokens, sharing)
    # rollout.tokens_per_forward: each scoring forward holds at most that many forwarded tokens.
    scored, scored_keys = context_share(s.job.train.context_parallel,
                                        min(forwarded, r.forward_tokens or forwarded), shared_keys)

    def scoring_cost(part: Part) -> tuple[int, int]:
        # The batch-invariant forward reads the policy whole: gathered, or its persistent buffers.
        exact = part is policy and r.exact and s.fsdp(part)
        return ((0 if r.persistent_weights else whole_bytes(part)) if exact
                else forward_gathered(s, part),
                forward_activations(part.config, elem, scored, lm_head=_has_lm_head(s, part),
                                    shared_keys=scored_keys)
                + vision_activations(part.config, elem, scored, trained=False))
    decoders = [part for part in s.parts if part.config is not None]
    gathered_s, act_s = max((scoring_cost(part) for part in decoders), key=sum)
    scoring = {**base, "gathered": gathered_s, "activations": act_s}

    # A micro-batch of rows may hold one row per group (minibatches draw random rows): whole rows.
    tokens = s.cfg.microbatch_tokens or (p.microbatch_size or p.minibatch_size) * longest
    critic = _critic_decoder(s)
    update = update_phase(s, tokens, [policy] + ([critic] if critic else []), shared_keys)
    export = {**base, "gathered": export_gathered(s, [policy, *_role(s, "critic")])}
    if _role(s, "critic adapters"):  # LoRACritic.merged: a ValueModel on its trunk's own shards
        export["gathered"] = max(export["gathered"], export_gathered(s, [critic]))
    return {"load": load_phase(s), "rollout": rollout, "scoring": scoring, "update": update,
            "export": export}


def plan_phases(s: Setup) -> tuple[dict, PoolFigures | None]:
    """({phase: {category: bytes per GPU}} for the stage, every category present in every phase; the
    KV pool of a PPO stage, counted in the phases that hold it, else None)."""
    ppo = s.stage in ("ppo", "grpo")
    phases = ppo_phases(s) if ppo else supervised_phases(s)
    phases = {name: {cat: int(phases[name].get(cat, 0)) for cat in CATEGORIES}
              for name in PHASES if name in phases}
    if not ppo:
        return phases, None
    pool = kv_pool(s, phases)
    for name in pool_phases(s):
        phases[name]["kv_pool"] = pool.bytes
    return phases, pool


def model_rows(s: Setup) -> list[dict]:
    """One row per model: its parameters, whole bytes, whether sharded, its trained parameters."""
    return [{"role": part.role, "parameters": sum(p.numel() for p in unique_params(part.module)),
             "bytes": whole_bytes(part), "sharded": s.fsdp(part),
             "trained_parameters": sum(p.numel() for p in part.trained)} for part in s.parts]


def host_optimizer_bytes(s: Setup) -> int:
    """The optimizer state in CPU memory (train.optimizer_offload), per rank."""
    return optimizer_bytes(s, on_gpu=False)

"""The models of a stage, built on the meta device with the engine's own classes (no weights, no
memory), and what their parameters weigh: whole, as one rank's FSDP2 shards, as FSDP units.

`supervised_models` and `ppo_models` mirror what each stage builds today (engine/stages/sft.py,
rm.py, ppo/trainer.py:build_models): which models exist, which are sharded under torchrun and which
whole on every rank (the LoRA-adapted ones), and which parameters the optimizers step.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..model.causal_lm import CausalLM
from ..model.config import ModelConfig
from ..model.reward_model import RewardModel
from ..model.value_model import LoRACritic, ValueModel, shared_value_head
from ..model.vision_language import vision_variant
from ..train import adapters
from ..train.vision_tower import set_vision_trainable
from ..parallel.distributed import shard_units


@dataclass
class Part:
    """One model of a run. `sharded`: an FSDP2 model under torchrun (else whole on every rank);
    `trained`: the parameters its optimizer steps that get gradients; `adapted`: a LoRA base
    (tensor-parallel, its slices are copied across the data groups)."""
    role: str
    module: nn.Module
    sharded: bool
    trained: list = field(default_factory=list)
    config: ModelConfig | None = None   # decoder shapes (activations); None for a head alone
    adapted: bool = False


def unique_params(module: nn.Module) -> list[nn.Parameter]:
    """The module's parameters, a tied one once (as nn.Module.parameters gives them)."""
    return list(module.parameters())


def param_bytes(p: torch.Tensor) -> int:
    return p.numel() * p.element_size()


def local_numel(p: torch.Tensor, ranks: int) -> int:
    """Elements of `p` on rank 0 of a shard group of `ranks`: FSDP2 shards dim 0 in ceil(dim0 /
    ranks) rows (rank 0 holds the most); ranks 1: a whole parameter, all of them."""
    if ranks == 1:
        return p.numel()
    rows = p.shape[0]
    return math.ceil(rows / ranks) * (p.numel() // rows)


def unit_bytes(module: nn.Module, skip: set[int] = frozenset()) -> tuple[list[int], int]:
    """(bytes of each decoder layer's FSDP unit, bytes of the other units together: the heads of
    another dtype and the root: embeddings, final norm, LM head), by distributed.shard_units, each
    parameter counted in its innermost unit; the parameters whose ids are in `skip` (FSDP's
    ignored ones: expert-parallel experts) in none."""
    layers = {id(layer) for layer in getattr(getattr(module, "model", None), "layers", [])}
    seen: set[int] = set(skip)
    layer_sizes, rest = [], 0
    for unit in shard_units(module):
        own = [p for p in unit.parameters() if id(p) not in seen]
        seen.update(id(p) for p in own)
        size = sum(param_bytes(p) for p in own)
        if id(unit) in layers:
            layer_sizes.append(size)
        else:
            rest += size
    return layer_sizes, rest


def gets_gradient(model: nn.Module, name: str, lm_loss: bool) -> bool:
    """Whether a trainable parameter gets a gradient: the untied LM head of a reward or value model
    is read by no loss (unless the reward model's LM term is on), so its optimizer state is never
    created (FusedAdamW creates state at a parameter's first gradient)."""
    if name == "lm_head.weight" and isinstance(model, (RewardModel, ValueModel)):
        return lm_loss or model.config.tie_word_embeddings
    return True


def trained_params(model: nn.Module, lm_loss: bool = True) -> list[nn.Parameter]:
    return [p for name, p in model.named_parameters()
            if p.requires_grad and gets_gradient(model, name, lm_loss)]


def _meta(cls, config: ModelConfig, dtype: torch.dtype, train_vision: bool = False) -> nn.Module:
    """`cls(config, dtype)` on the meta device (its vision variant for a vision config, the tower
    trainable only with train.train_vision, as the stages set it). Its rotary table (no parameter:
    cos and sin of every position, built on the CPU whatever the device) is built for one
    position, not max_model_len."""
    if config.vision is not None:
        cls = vision_variant(cls)
    with torch.device("meta"):
        model = cls(dataclasses.replace(config, max_model_len=1), dtype)
    set_vision_trainable(model, train_vision)
    return model


def _language_model(config: ModelConfig, dtype: torch.dtype, train_vision: bool = False):
    """The stage's language model on meta: a VisionLanguageModel for a vision config, else a
    CausalLM."""
    return _meta(CausalLM, config, dtype, train_vision)


def _lora_parts(lora, role: str) -> list[Part]:
    """The adapters (and the heads trained with them), replicated on every rank."""
    return [Part(f"{role} adapters", lora, sharded=False, trained=list(lora.parameters()))]


def supervised_models(stage: str, cfg, config: ModelConfig, dtype: torch.dtype) -> list[Part]:
    """SFT: the causal LM; RM: the reward model built from it (a whole copy while loading). With
    lora.rank > 0 only its adapters (and head) train; its frozen base is sharded like any frozen
    model."""
    model = (_language_model(config, dtype, cfg.train.train_vision) if stage == "sft"
             else _meta(RewardModel, config, dtype, cfg.train.train_vision))
    heads = {"score": model.score} if stage == "rm" else None
    lora = adapters.attach(model, cfg.lora, heads)
    if lora is not None:
        return [
            Part("model", model, sharded=True, config=config, adapted=True),
            *_lora_parts(lora, "model")]
    lm_loss = stage == "sft" or cfg.beta_rm > 0
    return [
        Part("model", model, sharded=True, trained=trained_params(model, lm_loss), config=config)]


def ppo_models(cfg, policy_config: ModelConfig, rm_config: ModelConfig | None,
               dtype: torch.dtype, teacher_config: ModelConfig | None = None) -> list[Part]:
    """The models of build_models (engine/stages/ppo/trainer.py), on the meta device: the policy
    (a frozen base with lora), the reference (none with lora), the reward model (when reward_model
    is set), the critic (separate: a ValueModel, or with critic_lora adapters on the reward model's
    decoder or on a frozen copy of the policy) or the shared value head. An adapted model's frozen
    base is sharded like any frozen model. With `teacher_config` (distillation: its stage loads no
    reference) the frozen teacher stands where the reference would."""
    policy = _language_model(policy_config, dtype, cfg.train.train_vision)
    lora = adapters.attach(policy, cfg.lora)
    parts = [
        Part("policy", policy, sharded=True,
             trained=[] if lora else trained_params(policy), config=policy_config,
             adapted=lora is not None)]
    if lora is not None:
        parts += _lora_parts(lora, "policy")
    if teacher_config is not None:
        parts.append(Part("teacher", _language_model(teacher_config, dtype), sharded=True,
                          config=teacher_config))
    elif lora is None:
        parts.append(
            Part("reference", _language_model(policy_config, dtype), sharded=True,
                 config=policy_config))
    rm = _meta(RewardModel, rm_config, dtype) if rm_config is not None else None
    lora_critic_on_rm = cfg.critic == "separate" and cfg.critic_lora.enabled and rm is not None
    if rm is not None:
        parts.append(
            Part("reward model", rm, sharded=True,
                 config=rm_config, adapted=lora_critic_on_rm))
    if cfg.critic == "shared":
        head = shared_value_head(policy)
        parts.append(
            Part("value head", head, sharded=lora is None, trained=list(head.parameters())))
    elif cfg.critic == "separate" and not cfg.critic_lora.enabled:
        trunk_config = rm_config or policy_config
        critic = _meta(ValueModel, trunk_config, dtype, cfg.train.train_vision)
        parts.append(
            Part("critic", critic, sharded=True, trained=trained_params(critic, lm_loss=False),
                 config=trunk_config))
    elif cfg.critic == "separate":
        trunk = rm if rm is not None else _meta(CausalLM, policy_config, dtype)
        if rm is None:  # a frozen copy of the policy's weights
            parts.append(
                Part("critic trunk", trunk, sharded=True, config=policy_config,
                     adapted=True))
        head_init = torch.zeros(1, trunk.config.hidden_size, device="meta")
        critic = LoRACritic(trunk, head_init, cfg.critic_lora)
        parts += _lora_parts(critic.lora, "critic")
    return parts

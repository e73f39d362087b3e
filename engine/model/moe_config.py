"""The mixture-of-experts fields of a Hugging Face config (Qwen3-MoE, Mixtral), validated.

`moe_from_hf` reads them into a `MoEConfig` (None for a dense architecture); MoE variants whose
routing or experts the decoder does not reproduce exactly are refused in one line naming what is
missing (`UNSUPPORTED_MOE`, checked with the model type before transformers reads the config).
"""
from __future__ import annotations

from dataclasses import dataclass

# model_type -> what of it the decoder does not implement: refused by name, not as "unknown".
UNSUPPORTED_MOE = {
    "qwen2_moe": "shared experts (shared_expert + shared_expert_gate)",
    "deepseek_v2": "shared experts and grouped top-k routing (n_group / topk_group)",
    "deepseek_v3":
    "shared experts and grouped top-k routing (n_group / topk_group) with sigmoid scores",
    "glm4_moe": "shared experts and grouped top-k routing with sigmoid scores",
    "olmoe": "q/k RMSNorm over the whole projection",
    "dbrx": "its fused expert layout and clipped q/k/v",
}

# config.json's `scoring_func` (DeepSeek's key; absent: softmax, as Qwen3-MoE and Mixtral).
SCORING_FUNCS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    """Experts of the sparse layers: `sparse_layers` are the layer indices with an MoE block (the
    others keep a dense MLP of ModelConfig.intermediate_size); each token goes to `top_k` of
    `num_experts` experts of `intermediate_size`, weighted by its router scores (`scoring_func`:
    "softmax" over the experts, or "sigmoid" of each logit as DeepSeek's routers; renormalized
    over the top k when `norm_topk_prob`). `fp32_weights`: the weights multiply the
    experts' outputs in fp32 (Mixtral) instead of the activation dtype (Qwen3-MoE).
    `legacy_names`: the checkpoint's per-expert layout, (block name, gate, up, down), which
    transformers' save_pretrained writes and older checkpoints carry."""

    num_experts: int
    top_k: int
    intermediate_size: int
    sparse_layers: tuple[int, ...]
    norm_topk_prob: bool
    fp32_weights: bool
    router_aux_loss_coef: float
    legacy_names: tuple[str, str, str, str]
    scoring_func: str = "softmax"

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"config.json: num_experts_per_tok={self.top_k} must be in [1, num_experts="
                f"{self.num_experts}]")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(
                f"config.json: scoring_func={self.scoring_func!r} is not supported (expected one "
                "of "
                f"{', '.join(SCORING_FUNCS)})")


def moe_from_hf(hf_config, model_type: str) -> MoEConfig | None:
    """The MoE part of a transformers config of `model_type`; None for a dense architecture."""
    if model_type == "mixtral":
        jitter = getattr(hf_config, "router_jitter_noise", 0.0) or 0.0
        if jitter:
            raise ValueError(
                f"config.json: router_jitter_noise={jitter} is not supported (expected 0: the "
                "training forward must route as the sampler does)")
        return MoEConfig(
            num_experts=_positive(hf_config, "num_local_experts"),
            top_k=_positive(hf_config, "num_experts_per_tok"),
            intermediate_size=_positive(hf_config, "intermediate_size"),
            sparse_layers=tuple(range(hf_config.num_hidden_layers)), norm_topk_prob=True,
            fp32_weights=True,
            router_aux_loss_coef=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
            legacy_names=("block_sparse_moe", "w1", "w3", "w2"), scoring_func=_scoring(hf_config))
    if model_type == "qwen3_moe":
        num_experts = getattr(hf_config, "num_experts", 0) or 0
        step = _positive(hf_config, "decoder_sparse_step")
        dense = set(getattr(hf_config, "mlp_only_layers", None) or ())
        sparse = tuple(i for i in range(hf_config.num_hidden_layers)
                       if num_experts > 0 and i not in dense and (i + 1) % step == 0)
        if not sparse:
            return None  # every layer dense: a Qwen3 decoder with Qwen3-MoE's names
        return MoEConfig(
            num_experts=num_experts, top_k=_positive(hf_config, "num_experts_per_tok"),
            intermediate_size=_positive(hf_config, "moe_intermediate_size"), sparse_layers=sparse,
            norm_topk_prob=bool(hf_config.norm_topk_prob), fp32_weights=False,
            router_aux_loss_coef=float(getattr(hf_config, "router_aux_loss_coef", 0.0) or 0.0),
            legacy_names=("mlp", "gate_proj", "up_proj", "down_proj"),
            scoring_func=_scoring(hf_config))
    return None


def _scoring(hf_config):
    """config.json's scoring_func as written (MoEConfig checks it), softmax when absent."""
    value = getattr(hf_config, "scoring_func", None)
    return "softmax" if value is None else value


def _positive(hf_config, name: str) -> int:
    value = getattr(hf_config, name, None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.json: {name}={value!r} must be a positive int")
    return value

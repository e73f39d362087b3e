"""Tiny random Qwen3-MoE and Mixtral models (8 experts, top-2) for the MoE tests, shaped as
engine_testing's dense ones."""
import torch

from engine_testing import BASE, hf_class, make_tokenizer

# arch -> (transformers' config class, its causal-LM class, config overrides), by name
# (engine_testing imports transformers on first use).
MOE_ARCHS = {
    # Layer 0 dense (mlp_only_layers), layer 1 sparse: both kinds of layer in one model.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        mlp_only_layers=[0])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=None)),
}


def make_moe_model(arch: str, seed: int = 0, **overrides):
    """A transformers MoE model with weights of std 0.15 (separated argmaxes, as make_hf_model)
    and a router of std 1, so that tokens spread over the experts."""
    config_name, model_name, extra = MOE_ARCHS[arch]
    torch.manual_seed(seed)
    model = hf_class(model_name)(hf_class(config_name)(**{**BASE, **extra, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 1.0 if name.endswith("gate.weight") else 0.15)
    return model


def save_moe_base(directory, arch: str = "qwen3_moe", **overrides):
    """make_moe_model(arch, **overrides) saved with the tests' tokenizer in `directory` (returned)."""
    make_moe_model(arch, **overrides).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory

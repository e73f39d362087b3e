"""How a transformers config transforms its LM head's logits, read as TRL reads it: the scale
before the soft cap (Cohere's logit_scale, Muse's output_multiplier, Falcon-H1's
lm_head_multiplier, Granite's and MiniCPM3's 1 / logits_scaling, HyperCLOVA X's logits_scaling)
and Gemma-2's final_logit_softcapping. Users: trl.py's fused head, trl_distill.py's trainer."""
from __future__ import annotations


def head_transform(config) -> tuple[float, float | None]:
    """(logit_scale, softcap) of a transformers config's LM head, read as TRL reads them."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        scale = getattr(text, name, None) if scale is None else scale
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = (text.logits_scaling if text.model_type == "hyperclovax"
                 else 1 / text.logits_scaling)
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)

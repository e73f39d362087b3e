"""The output of a patched causal LM's forward with labels (hf_forwards.causal_lm_forward); its own
module because it imports transformers."""
from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Optional

from transformers.utils import ModelOutput

# transformers 5.2x calls the decoder's cache `cache` (past_key_values a deprecated alias property)
CACHE_FIELD = ("cache" if isinstance(getattr(ModelOutput, "past_key_values", None), property)
               else "past_key_values")
FIELDS = ("loss", "logits", "logprobs", "entropy", "aux_loss", CACHE_FIELD, "hidden_states",
          "attentions", "router_logits")

CausalLMLogProbsOutput = make_dataclass(
    "CausalLMLogProbsOutput", [(name, Optional[object], field(default=None)) for name in FIELDS],
    bases=(ModelOutput,), namespace={"__module__": __name__, "__doc__": (
        "loss: transformers' causal LM loss (scalar); logprobs, entropy: [B, L] fp32, per position "
        "(0 where the target is ignored); logits: None (never made); the rest as transformers' "
        "output (aux_loss and router_logits for a mixture of experts).")})

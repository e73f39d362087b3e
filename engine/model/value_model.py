"""The critic: a value for every response token, from a separate model or from the policy's trunk.

"separate" (InstructGPT's choice): a decoder of its own with a `value_head` [1, H], initialized
from the reward model (its `score` head becomes the value head), saved as a Hugging Face directory
whose extra tensor is `value_head.weight`. "shared": a `value_head` on the policy's final hidden
states, computed in the policy's own forward (one forward per minibatch instead of two).
"""
from __future__ import annotations

import torch
from torch import nn

from .hf_io import load_model, save_model
from .config import ModelConfig
from .causal_lm import CausalLM, rebuild_as
from .scalar_head import ScalarHead
from .reward_model import RewardModel
from ..data.packing import PackedBatch

class ValueModel(CausalLM):
    """Decoder + `value_head`; the LM head is kept (unused) so the directory stays a causal LM."""

    def __init__(self, config: ModelConfig, dtype=torch.float32):
        super().__init__(config, dtype)
        self.value_head = ScalarHead(config.hidden_size)

    def response_values(self, packed: PackedBatch) -> torch.Tensor:
        """Values [R, T] (fp32) at the positions that predict each response token."""
        hidden = self.forward_packed(packed.input_ids, packed.seqlens, packed.positions, packed.cu_seqlens)
        values = self.value_head(hidden.index_select(0, packed.target_rows)).squeeze(-1)
        return packed.to_grid(values)


def value_model_from_reward_model(rm: RewardModel) -> ValueModel:
    """A critic starting as a copy of the reward model, its score head as the value head."""
    return rebuild_as(ValueModel, rm, {("value_head.weight" if k == "score.weight" else k): v
                             for k, v in rm.state_dict().items()})


def value_model_from_lm(lm: CausalLM) -> ValueModel:
    """A critic starting as a copy of a causal LM with a zero value head (no reward model given)."""
    zeros = lm.lm_head.weight.new_zeros(1, lm.config.hidden_size)
    return rebuild_as(ValueModel, lm, {**lm.state_dict(), "value_head.weight": zeros})


def shared_value_head(policy: CausalLM) -> ScalarHead:
    """A zero-initialized value head reading the policy's hidden states (all values start at 0)."""
    head = ScalarHead(policy.config.hidden_size, device=next(policy.parameters()).device)
    nn.init.zeros_(head.weight)
    return head


def save_value_model(critic: ValueModel, out_dir, source_dir=None):
    save_model(critic, out_dir, source_dir=source_dir)


def load_value_model(model_dir, dtype="auto", device="cpu") -> ValueModel:
    return load_model(model_dir, dtype=dtype, device=device, model_cls=ValueModel)

"""The reward model: the decoder plus a scalar head reading each sequence's last token.

Saved format (one directory, loadable three ways):
- config.json: the base model's config plus `num_labels: 1` and `reward_offset: float`.
- model.safetensors: the decoder, `lm_head.weight` (used by the beta_rm LM term) and
  `score.weight` [1, hidden] (no bias): the tensor name and shape of transformers'
  `*ForSequenceClassification` head, which also reads the last non-pad token.
- `AutoModelForSequenceClassification.from_pretrained(dir)` gives raw scores (logits[:, 0]);
  subtract `config.reward_offset` for normalized ones. `AutoModelForCausalLM` loads the LM and
  ignores `score.weight`. Our engine: `load_reward_model(dir)` returns normalized rewards.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from ..data.device_tensors import last_rows
from ..runs.durable import check_finite
from .hf_io import load_config, load_model, save_model
from .config import ModelConfig
from .causal_lm import CausalLM, rebuild_as
from .scalar_head import ScalarHead


class RewardModel(CausalLM):
    """CausalLM + `score` head. `reward_offset` is subtracted from raw scores (0 until
    normalized)."""

    def __init__(self, config: ModelConfig, dtype=torch.float32):
        # Own copy of the HF config: saving writes num_labels and the offset into it.
        config = dataclasses.replace(config, hf_config=copy.deepcopy(config.hf_config))
        super().__init__(config, dtype)
        self.score = ScalarHead(config.hidden_size)
        self.reward_offset = float(getattr(config.hf_config, "reward_offset", 0.0) or 0.0)

    def raw_rewards(self, hidden: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        """hidden [N, H] of packed sequences -> fp32 scores at each sequence's last token [S]."""
        last = last_rows(seqlens, hidden.device)    # [S]
        return self.score(hidden.index_select(0, last)).squeeze(-1)

    @torch.no_grad()
    def rewards(self, input_ids: torch.Tensor, seqlens: list[int], positions=None,
                cu_seqlens=None) -> torch.Tensor:
        """Normalized rewards [S] of packed sequences input_ids [N] (positions, cu_seqlens: see
        forward_packed)."""
        hidden = self.forward_packed(input_ids, seqlens, positions, cu_seqlens)
        return self.raw_rewards(hidden, seqlens) - self.reward_offset

    @torch.no_grad()
    def packed_rewards(self, packed) -> torch.Tensor:
        """Normalized rewards [S] of a PackedBatch's rows (each group's prompt read once where the
        pack shares prompts: CausalLM.forward_rows)."""
        hidden, _, last = self.forward_rows(packed)
        return self.score(hidden.index_select(0, last)).squeeze(-1) - self.reward_offset


def reward_model_from_lm(lm: CausalLM) -> RewardModel:
    """A RewardModel sharing `lm`'s config with a copy of its weights and a fresh score head.

    The head starts at zero so every initial reward is 0 and the first updates come from the
    ranking loss alone, not from a random projection of the SFT features.
    """
    rm = rebuild_as(RewardModel, lm, lm.state_dict(), strict=False)
    missing, unexpected = rm.load_report
    if set(missing) != {"score.weight"} or unexpected:
        raise ValueError(
            f"cannot build a reward model from this LM: missing {missing}, unexpected {unexpected}")
    nn.init.zeros_(rm.score.weight)
    return rm


def save_reward_model(rm: RewardModel, out_dir, source_dir=None, kind=None, before_rename=None):
    """Write the reward model as described in the module docstring (atomically, via save_model,
    which marks it as the output of the command `kind` when given and calls `before_rename`)."""
    check_finite([("reward_offset", torch.tensor(rm.reward_offset))],
                 f"the reward model for {out_dir}")
    hf = rm.config.hf_config
    hf.num_labels = 1
    hf.reward_offset = rm.reward_offset
    save_model(rm, out_dir, source_dir=source_dir, kind=kind, before_rename=before_rename)


def load_reward_model(model_dir, dtype="auto", device="cpu", shard=None) -> RewardModel:
    """Load a directory written by `save_reward_model` (offset included); `shard`: see
    hf_io.load_model."""
    return load_model(model_dir, dtype=dtype, device=device, model_cls=RewardModel, shard=shard)


def load_or_start_reward_model(model_dir, dtype="auto", device="cpu") -> RewardModel:
    """A reward model directory (its config holds reward_offset) as it is, else a causal LM's
    directory with a fresh zero score head (as reward_model_from_lm gives)."""
    if getattr(load_config(model_dir).hf_config, "reward_offset", None) is not None:
        return load_reward_model(model_dir, dtype=dtype, device=device)
    return load_model(model_dir, dtype=dtype, device=device, model_cls=RewardModel,
                      fresh=["score.weight"])

"""The critic: a value for every response token, from a separate model or from the policy's trunk.

"separate" (InstructGPT's choice): a decoder of its own with a `value_head` [1, H], initialized
from the reward model (its `score` head becomes the value head), saved as a Hugging Face directory
whose extra tensor is `value_head.weight`. "shared": a `value_head` on the policy's final hidden
states, computed in the policy's own forward (one forward per minibatch instead of two).
"separate" with LoRA (`LoRACritic`): no decoder of its own: adapters and a value head on a frozen
trunk it does not own, the reward model's (whose forward then runs with the critic's adapters off).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch
from torch import nn

from ..ranks import sharded
from .hf_io import load_model, save_model
from .config import ModelConfig
from .causal_lm import CausalLM, rebuild_as
from .scalar_head import ScalarHead
from .reward_model import RewardModel
from ..config.lora import LoRAConfig
from .lora import add_lora


class PackedTargets(Protocol):
    """What a value forward reads of a packed batch (engine/data/packing.py's PackedBatch is one):
    the packed tokens [N] with their sequence lengths, positions [N] and boundaries [S + 1], the
    rows [M] whose hidden states predict the targets, the rows' shared prompts (their prefix groups
    and prompt lengths, [] when not shared), and the scatter of [M] target values to a grid."""
    input_ids: torch.Tensor
    seqlens: list[int]
    positions: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    target_rows: torch.Tensor
    prefix_groups: list[int]
    prompt_lens: list[int]

    def to_grid(self, values: torch.Tensor) -> torch.Tensor: ...


def values_at_targets(trunk: CausalLM, head: nn.Module, packed: PackedTargets) -> torch.Tensor:
    """Values [R, T] (fp32) of `head` on `trunk`'s hidden states at the positions that predict
    each response token of `packed`."""
    hidden, target_rows, _ = trunk.forward_rows(packed)
    return packed.to_grid(head(hidden.index_select(0, target_rows)).squeeze(-1))

class ValueModel(CausalLM):
    """Decoder + `value_head`; the LM head is kept (unused) so the directory stays a causal LM."""

    def __init__(self, config: ModelConfig, dtype=torch.float32):
        super().__init__(config, dtype)
        self.value_head = ScalarHead(config.hidden_size)

    def response_values(self, packed: PackedTargets) -> torch.Tensor:
        """Values [R, T] (fp32) at the positions that predict each response token."""
        return values_at_targets(self, self.value_head, packed)


class LoRACritic(nn.Module):
    """The critic as LoRA adapters plus a value head on a frozen `trunk` it does not own (not a
    submodule: its parameters are neither the critic's to train nor to save). The adapters are
    forward hooks on the trunk's projections, so any other forward of the trunk (the reward model
    scoring) must run inside `lora.disabled()`.

    value_head: fp32 [1, H], a copy of `head_init` [1, H], trained in full and saved with the
    adapters as PEFT's modules_to_save "score" (the adapters then load onto the trunk's directory as
    a sequence classifier). train()/eval() set the trunk's mode too: it only drives the adapters'
    dropout (the decoder has none), alike in a forward and its checkpointed recompute."""

    def __init__(self, trunk: CausalLM, head_init: torch.Tensor, cfg: LoRAConfig):
        super().__init__()
        self.value_head = ScalarHead(trunk.config.hidden_size, device=head_init.device)
        with torch.no_grad():
            self.value_head.weight.copy_(head_init)
        self.lora = add_lora(trunk, cfg, {"score": self.value_head})
        self._trunk = (trunk,)  # a tuple hides it from nn.Module's registry

    @property
    def trunk(self) -> CausalLM:
        return self._trunk[0]

    def train(self, mode: bool = True) -> "LoRACritic":
        self.trunk.train(mode)
        return super().train(mode)

    def response_values(self, packed: PackedTargets) -> torch.Tensor:
        """Values [R, T] (fp32) at the positions that predict each response token, adapters on."""
        return values_at_targets(self.trunk, self.value_head, packed)

    def merged(self) -> ValueModel:
        """The critic as a ValueModel (for the export once the run is over): the adapters merged
        into the trunk's weights in place (each rank into its shards), and a ValueModel that shares
        the trunk's decoder and LM head and this value head, nothing copied (built on the meta
        device, its own parameters replaced before any is allocated)."""
        sharded.reshard(self.trunk)
        self.lora.merge_()
        with torch.device("meta"):
            view = ValueModel(self.trunk.config, self.trunk.lm_head.weight.dtype)
        view.model, view.lm_head = self.trunk.model, self.trunk.lm_head
        view.value_head = self.value_head
        return view


def value_model_from_reward_model(rm: RewardModel) -> ValueModel:
    """A critic starting as a copy of the reward model, its score head as the value head."""
    return rebuild_as(ValueModel, rm, {("value_head.weight" if k == "score.weight" else k): v
                             for k, v in rm.state_dict().items()})


def shared_value_head(policy: CausalLM) -> ScalarHead:
    """A zero-initialized value head reading the policy's hidden states (all values start at 0)."""
    head = ScalarHead(policy.config.hidden_size, device=next(policy.parameters()).device)
    nn.init.zeros_(head.weight)
    return head


def save_value_model(critic: ValueModel, out_dir, source_dir=None):
    save_model(critic, out_dir, source_dir=source_dir)


def load_value_model(model_dir, dtype="auto", device="cpu", shard=None,
                     start: Optional[str] = None) -> ValueModel:
    """A ValueModel from `model_dir` (`shard`: see hf_io.load_model). start="reward_model": the
    directory is a reward model's, whose score head becomes the value head; "lm": a causal LM's,
    with a zero value head; None: a critic's own directory (value_head.weight in it)."""
    if start not in (None, "reward_model", "lm"):
        raise ValueError(f"start={start!r}: expected None, 'reward_model' or 'lm'")
    return load_model(model_dir, dtype=dtype, device=device, model_cls=ValueModel, shard=shard,
                      renames={"score.weight": "value_head.weight"} if start == "reward_model"
                      else None,
                      fresh=["value_head.weight"] if start == "lm" else ())

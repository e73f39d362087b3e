"""The models of a PPO run, held together (forwards.py runs them over a rollout, reward_scores.py
scores)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from ...inference.hybrid_actor import HybridActor
from ...model.causal_lm import CausalLM
from ...model.lora import LoRA
from ...model.value_model import LoRACritic, ValueModel
from ...parallel.distributed import WORLD, DataRanks
from .reward_scores import Scorer


@dataclass
class PPOModels:
    """The policy (shared with the actor), the frozen reference, the critic and the scorer. With
    LoRA the policy's weights are frozen, `lora` holds its adapters and there is no reference model:
    the reference is the policy with its adapters off. With critic_lora the critic is a LoRACritic:
    adapters and a value head on the reward model's own frozen decoder (the scorer's forward runs
    with them off)."""
    policy: CausalLM
    reference: Optional[CausalLM]       # None with lora
    actor: HybridActor
    critic: Optional[ValueModel | LoRACritic]  # critic="separate" (LoRACritic with critic_lora)
    value_head: Optional[nn.Linear]     # critic="shared"
    score: Scorer                       # (prompts, responses) token ids -> scores [R]
    lora: Optional[LoRA] = None         # lora.rank > 0
    # The ranks holding different rows, the rollout's sums and gathers run over: every rank, or at
    # tensor parallelism one of each tensor group (TensorParallel.data_ranks).
    ranks: DataRanks = WORLD

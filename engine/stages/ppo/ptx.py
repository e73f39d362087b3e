"""The PPO-ptx term (InstructGPT): the policy's next-token NLL on a stream of demonstrations, added
to each minibatch's loss with weight ppo.ptx_coef."""
from __future__ import annotations

import torch

from ...data.packing import collate_sft
from ...data.tokenization import TokenizedExample
from ...model.causal_lm import CausalLM
from ...train.supervised import DataPosition, micro_batches, to_device
from ..sft import sft_loss


class PtxLoss:
    """`ptx(position)`: the mean NLL of `policy` on the next micro-batch (tokens_per_batch tokens)
    of `examples`, shuffled per epoch by `seed`. `position` (the loop state's ptx dict: epoch and
    batch_index) says where the stream stands and is advanced in place, so a resumed run continues
    with the batches it would have seen; the stream opens at the first call, from it."""

    def __init__(self, policy: CausalLM, examples: list[TokenizedExample], tokens_per_batch: int,
                 seed: int, device: torch.device):
        self.policy, self.examples, self.device = policy, examples, device
        self.tokens_per_batch, self.seed = tokens_per_batch, seed
        self._stream = None

    def __call__(self, position: dict) -> torch.Tensor:
        if self._stream is None:
            self._stream = micro_batches(self.examples, self.tokens_per_batch, self.seed,
                                         DataPosition(**position))
        epoch, index, batch = next(self._stream)
        position.update(epoch=epoch, batch_index=index + 1)
        batch = to_device(collate_sft(batch), self.device)
        return sft_loss(self.policy, batch, {"tokens": batch.num_targets})[0]

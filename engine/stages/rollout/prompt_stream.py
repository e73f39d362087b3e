"""The prompt stream of a PPO run: consecutive slices of one seeded permutation of the prompts per
epoch, each rank taking its share, the position kept in the loop state (PPOState.prompts_drawn) so
a resumed run draws exactly the prompts it would have drawn."""
from __future__ import annotations

from ...data.packing import epoch_order
from ...data.prompts import PromptRow
from ...parallel import distributed
from .state import PPOState


def prompt_indices(n_prompts: int, count: int, seed: int, start: int) -> list[int]:
    """`count` prompts from position `start` of the prompt stream: consecutive slices of one seeded
    permutation per epoch, so a resumed run continues with exactly the prompts it would have
    seen."""
    out = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n_prompts)
        out += epoch_order(n_prompts, seed, epoch)[offset:offset + count - len(out)]
    return out


def next_prompts(prompts: list[PromptRow], per_rank: int, seed: int, state: PPOState,
                 ranks: distributed.DataRanks = distributed.WORLD) -> list[PromptRow]:
    """This rank's `per_rank` of the stream's next per_rank x data `ranks` prompts (a tensor group's
    ranks take the same ones); advances state.prompts_drawn past all of them."""
    count = per_rank * ranks.size()
    picked = prompt_indices(len(prompts), count, seed, state.prompts_drawn)
    state.prompts_drawn += count
    return [prompts[i] for i in picked[distributed.rank_slice(per_rank, ranks)]]

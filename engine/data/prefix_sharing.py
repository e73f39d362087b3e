"""Prefix-shared forwards: a group's rows (one prompt, n answers) forwarded as the prompt once
followed by its answers, each answer attending to the prompt and to itself only.

A PackedBatch stays a batch of logical rows (prompt + answer each, as every consumer reads it: the
targets, the [R, T] grid, `select`); with `prefix_groups` set, rows of one group share their first
`prompt_lens` tokens, and `share_prefixes` gives the forward's layout: the token stream with each
group's prompt once, the attention segments (a prompt: causal over itself; an answer: its queries
after the prompt's keys, bottom-right causal, as a prefill after a cached prefix is), and where the
rows' targets and last tokens lie in that stream. Positions are the rows' own (an answer's continue
from its prompt's length), so the hidden states equal the unshared pack's; the prompt's gradient
accumulates from every answer through the key gather's backward.

A context dimension can later shard this layout as it shards any pack: the segments and their key
rows are plain varlen metadata (a rank takes a contiguous slice of the stream and the keys its
queries read), nothing here assumes one device.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class SharedLayout:
    """The token stream of a forward over a pack whose rows share prompts (see module docstring).

    N' tokens in S' segments; an answer segment's keys are its prompt's then its own."""
    token_index: torch.Tensor   # [N'] int64 the pack's token at each stream position
    seqlens_q: list[int]        # [S'] tokens of each segment
    seqlens_k: list[int]        # [S'] keys each segment reads (its prompt's + its own)
    cu_seqlens_q: torch.Tensor  # [S' + 1] int32
    cu_seqlens_k: torch.Tensor  # [S' + 1] int32
    key_rows: torch.Tensor      # [sum seqlens_k] int64 stream position of each segment's keys
    target_rows: torch.Tensor   # [M] int64 stream position predicting each of the pack's targets
    last_rows: torch.Tensor     # [S] int64 stream position of each row's last token

    @property
    def tokens(self) -> int:
        return sum(self.seqlens_q)


def prompt_groups(prompts: list[list[int]], images: list | None = None) -> list[int]:
    """[R] group id of each row: rows with the same prompt tokens share an id (first-seen order);
    images: each row's prompt images (a vision model's ImageInputs, None: text), which rows must
    share too, as the same object (a group's rows hold their prompt row's): two prompts of the
    same tokens over other pixels are other prompts."""
    ids: dict[tuple, int] = {}
    shown = images or [None] * len(prompts)
    return [ids.setdefault((tuple(p), None if i is None else id(i)), len(ids))
            for p, i in zip(prompts, shown)]


def members(groups: list[int]) -> dict[int, list[int]]:
    """{group id: its rows in order}, groups in first-appearance order."""
    out: dict[int, list[int]] = {}
    for row, g in enumerate(groups):
        out.setdefault(g, []).append(row)
    return out


def forwarded_tokens(seqlens: list[int], prompt_lens: list[int], groups: list[int]) -> int:
    """Tokens a forward over these rows reads with each group's prompt once (no groups: all)."""
    if not groups:
        return sum(seqlens)
    return sum(sum(seqlens[r] for r in rows) - (len(rows) - 1) * prompt_lens[rows[0]]
               for rows in members(groups).values())


def grouped_order(rows: list[int], groups: list[int]) -> list[int]:
    """`rows` with each group's rows brought together, at its first row's place (stable): a
    minibatch's micro-batches then hold whole groups where the budget allows."""
    if not groups:
        return list(rows)
    by_group = members([groups[r] for r in rows])
    return [rows[i] for indices in by_group.values() for i in indices]


def share_prefixes(packed) -> SharedLayout | None:
    """The shared layout of a PackedBatch with `prefix_groups`, or None without (then the plain
    pack is the layout). A row alone in its group is cut the same way (its prompt, then its
    answer), so a row's segments, and the bits of its log-probs, do not depend on which rows of its
    group a pack holds (a minibatch scores what the whole rollout scored). Built on the host from
    the lengths: no device read."""
    groups, prompt_lens, seqlens = packed.prefix_groups, packed.prompt_lens, packed.seqlens
    if not groups:
        return None
    starts = list(itertools.accumulate(seqlens, initial=0))
    token_index, new_of_old = [], [0] * starts[-1]
    seqlens_q, seqlens_k, key_rows, last_rows = [], [], [], [0] * len(seqlens)

    def segment(old_start: int, length: int, prefix: range = range(0)) -> int:
        """Append the pack's tokens [old_start, + length) as a segment after keys `prefix`."""
        new = len(token_index)
        token_index.extend(range(old_start, old_start + length))
        new_of_old[old_start:old_start + length] = range(new, new + length)
        seqlens_q.append(length)
        seqlens_k.append(len(prefix) + length)
        key_rows.extend(prefix)
        key_rows.extend(range(new, new + length))
        return new

    for rows in members(groups).values():
        p = prompt_lens[rows[0]]
        prompt = segment(starts[rows[0]], p)
        for r in rows:
            answer = seqlens[r] - p
            if prompt_lens[r] != p or answer < 1:
                raise ValueError(f"prefix sharing: row {r} has {seqlens[r]} tokens and a prompt "
                                 f"of {prompt_lens[r]}; its group's prompt is {p} tokens and "
                                 "every row needs an answer after it")
            new_of_old[starts[r]:starts[r] + p] = range(prompt, prompt + p)
            last_rows[r] = segment(starts[r] + p, answer, range(prompt, prompt + p)) + answer - 1
    device = packed.input_ids.device

    def long(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    def cu(lengths):
        bounds = list(itertools.accumulate(lengths, initial=0))
        return torch.tensor(bounds, dtype=torch.int32, device=device)
    return SharedLayout(long(token_index), seqlens_q, seqlens_k, cu(seqlens_q), cu(seqlens_k),
                        long(key_rows), long(new_of_old).index_select(0, packed.target_rows),
                        long(last_rows))

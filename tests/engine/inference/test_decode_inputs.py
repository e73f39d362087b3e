"""DecodeInputs: a decode step's inputs written into persistent buffers equal the ones built from the
sequences directly, padding rows write and read nothing, every field is aligned as a tensor of its
own, and a step costs one host-to-device copy."""
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.engine.inference.decode_inputs import ALIGN, DecodeInputs
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.sequence import Sequence

BLOCK = 4


def random_sequences(count: int, seed: int) -> list[Sequence]:
    rng = random.Random(seed)
    seqs = []
    for i in range(count):
        n = rng.randint(1, 30)
        params = SamplingParams(temperature=rng.choice([0.0, 0.7, 1.3]), top_k=rng.randint(0, 50),
                                top_p=rng.random(), min_p=rng.random() / 4)
        seq = Sequence(i, Request([rng.randrange(1000) for _ in range(n)], params), rng.getrandbits(63))
        seq.block_table = rng.sample(range(100), -(-n // BLOCK))
        seqs.append(seq)
    return seqs


def expected_inputs(seqs: list[Sequence]) -> dict:
    """The inputs built field by field from the sequences (what the runner built before DecodeInputs)."""
    width = max(len(s.block_table) for s in seqs)
    last = [s.num_tokens - 1 for s in seqs]
    return dict(
        input_ids=torch.tensor([s.token_ids[-1] for s in seqs]), positions=torch.tensor(last),
        slot_mapping=torch.tensor([s.block_table[p // BLOCK] * BLOCK + p % BLOCK for s, p in zip(seqs, last)]),
        context_lens=torch.tensor([s.num_tokens for s in seqs], dtype=torch.int32),
        block_tables=torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                                  dtype=torch.int32),
        sampling=(torch.tensor([s.params.temperature for s in seqs]), torch.tensor([s.params.top_k for s in seqs]),
                  torch.tensor([s.params.top_p for s in seqs]), torch.tensor([s.seed for s in seqs]),
                  torch.tensor([s.num_tokens for s in seqs]), torch.tensor([s.params.min_p for s in seqs])))


@pytest.mark.parametrize("count,size", [(1, 1), (5, 5), (3, 4), (7, 8)])
def test_the_filled_rows_are_the_sequences_inputs_and_padding_rows_are_inert(count, size):
    inputs = DecodeInputs(rows=8, width=10, block_size=BLOCK, device="cpu")
    for seed in range(3):  # refills of the same buffers, wider and narrower tables
        seqs = random_sequences(count, seed)
        inputs.fill(seqs, size, full_tables=False)
        got, want = inputs.views(count, full_tables=False), expected_inputs(seqs)
        for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
            assert torch.equal(getattr(got, name), want[name]), name
        assert torch.equal(got.block_tables, want["block_tables"])
        for got_field, want_field in zip(got.sampling, want["sampling"]):
            assert torch.equal(got_field, want_field.to(got_field.dtype))
        inputs.fill(seqs, size, full_tables=True)
        padded = inputs.views(size, full_tables=True)
        assert padded.block_tables.shape == (size, 10)
        assert torch.equal(padded.block_tables[:count, :want["block_tables"].shape[1]], want["block_tables"])
        assert (padded.slot_mapping[count:] == -1).all() and (padded.context_lens[count:] == 0).all()
        assert (padded.sampling[0][count:] == 0).all()  # greedy: no filter reads a padding row's parameters


@pytest.mark.parametrize("rows", [1, 3, 50, 257])
def test_every_field_starts_where_an_allocation_of_its_own_would(rows):
    """Each tensor a step reads (every int64 and fp32 field, the context lengths, the packed
    tables) starts ALIGN bytes apart from the buffer's start, at any engine size: Triton compiles
    a pointer aligned to 16 bytes and one that is not apart (at rows = 50 the second fp32 field sat
    8 bytes off, a compile of each sampler kernel that 256 rows never needed)."""
    inputs = DecodeInputs(rows=rows, width=10, block_size=BLOCK, device="cpu")
    inputs.fill(random_sequences(min(rows, 7), 0), min(rows, 7), full_tables=False)
    views = inputs.views(min(rows, 7), full_tables=False)
    start = views.input_ids.data_ptr()
    fields = [views.positions, views.slot_mapping, views.context_lens, views.block_tables,
              *views.sampling]
    assert [(t.data_ptr() - start) % ALIGN for t in fields] == [0] * len(fields)
    assert start % 16 == 0


def test_a_batch_larger_than_its_rows_is_refused():
    inputs = DecodeInputs(rows=4, width=10, block_size=BLOCK, device="cpu")
    with pytest.raises(ValueError, match=r"decode batch of 3 sequences in 2 rows: expected 3 <= size <= 4"):
        inputs.fill(random_sequences(3, 0), 2, full_tables=False)


class CopyCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("full_tables", [False, True])
def test_a_step_sends_its_inputs_in_one_copy(full_tables):
    """One copy (the int64, fp32 and int32 rows: one buffer of bytes), plus the full-width table's
    one on-device copy for a graph, whatever the batch: no tensor is built per field or per
    row."""
    inputs = DecodeInputs(rows=64, width=10, block_size=BLOCK, device="cpu")
    for count in (1, 64):
        with CopyCounter() as counter:
            inputs.fill(random_sequences(count, 1), count, full_tables=full_tables)
        assert counter.ops.count("aten.copy_") == 1 + full_tables, counter.ops
        assert not {"aten.lift_fresh", "aten._to_copy", "aten.empty"} & set(counter.ops), counter.ops


def grow(seqs: list[Sequence], rng: random.Random, pool: list[int]) -> None:
    """One decode step's change to each sequence: a token appended, a page taken from `pool` when
    the token starts one (what BlockManager.append_slot does, in place)."""
    for s in seqs:
        s.append(rng.randrange(1000))
        if len(s.block_table) * BLOCK < s.num_tokens:
            s.block_table.append(pool.pop())


def assert_inputs(inputs: DecodeInputs, seqs: list[Sequence], size: int, full_tables: bool):
    """The filled rows equal the sequences' inputs field by field, and every byte sent equals what a
    fresh DecodeInputs writes for them (padding rows included)."""
    count = len(seqs)
    got, want = inputs.views(count, full_tables=False), expected_inputs(seqs)
    want["positions"] = want["positions"] + torch.tensor([s.rope_delta for s in seqs])
    for name in ("input_ids", "positions", "slot_mapping", "context_lens"):
        assert torch.equal(getattr(got, name), want[name]), name
    for got_field, want_field in zip(got.sampling, want["sampling"]):
        assert torch.equal(got_field, want_field.to(got_field.dtype))
    fresh = DecodeInputs(rows=inputs.rows, width=inputs.width, block_size=BLOCK, device="cpu")
    fresh.fill(seqs, size, full_tables)
    assert_same_views(inputs, fresh, size, full_tables)


def assert_same_views(inputs: DecodeInputs, fresh: DecodeInputs, size: int, full_tables: bool):
    """Every device tensor a step of `size` rows reads (its padding rows included) is the same in
    both: the packed block tables, and the full-width ones for a graph."""
    for tables in {False, full_tables}:
        got, want = inputs.views(size, tables), fresh.views(size, tables)
        for name in ("input_ids", "positions", "slot_mapping", "context_lens", "block_tables"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert all(map(torch.equal, got.sampling, want.sampling))


@pytest.mark.parametrize("count,size,full_tables", [(1, 1, True), (5, 8, True), (7, 7, False)])
def test_a_batch_one_token_further_writes_what_moved_and_equals_a_full_write(count, size,
                                                                            full_tables):
    """Steps of the same sequences, each a token longer (pages taken as they fill, an M-RoPE
    offset on one), write only what moved, and what they send is a full write's, byte for byte."""
    rng = random.Random(count)
    seqs = random_sequences(count, count)
    seqs[0].rope_delta = -3
    pool = list(range(100, 400))
    inputs = DecodeInputs(rows=8, width=16, block_size=BLOCK, device="cpu")
    inputs.fill(seqs, size, full_tables)
    writes, widenings = [], 0
    inputs._write = lambda *args, original=inputs._write: (writes.append(1), original(*args))
    for _ in range(3 * BLOCK + 1):  # every sequence takes at least one page
        widest = max(len(s.block_table) for s in seqs)
        grow(seqs, rng, pool)
        widenings += max(len(s.block_table) for s in seqs) > widest
        inputs.fill(seqs, size, full_tables)
        assert_inputs(inputs, seqs, size, full_tables)
    # a full write only where the widest table grew (the packed tables' layout changed)
    assert len(writes) == widenings < 3 * BLOCK + 1


@pytest.mark.parametrize("count,size,full_tables", [(1, 1, True), (5, 8, True), (7, 7, False)])
def test_a_step_launched_ahead_sends_what_a_step_after_its_draws_would(count, size, full_tables):
    """fill(previous=draws) of rows one token past their host tokens (a page taken ahead where the
    next token starts one: append_slots(ahead=1)) sends, byte for byte, what a fill sends once
    those draws are appended: its input ids are the draws, copied on the device."""
    rng = random.Random(count)
    seqs = random_sequences(count, count)
    seqs[0].rope_delta = 2
    pool = list(range(100, 400))
    inputs = DecodeInputs(rows=8, width=16, block_size=BLOCK, device="cpu")
    inputs.fill(seqs, size, full_tables)
    for _ in range(3 * BLOCK + 1):
        draws = torch.tensor([rng.randrange(1000) for _ in seqs])
        for s in seqs:
            if len(s.block_table) * BLOCK < s.num_tokens + 1:
                s.block_table.append(pool.pop())
        inputs.fill(seqs, size, full_tables, previous=draws)
        for s, token in zip(seqs, draws.tolist()):
            s.append(token)
        assert_inputs(inputs, seqs, size, full_tables)


def test_any_other_change_writes_every_row_again():
    """Another order, a sequence left out, a table replaced by one of the same length (a
    reallocation), two tokens further (also one sequence alone, its last page changed in place), a
    table wider than the packed width, another row count (padding rows that held real ones) or
    full_tables: each writes every row again, and the inputs are the sequences' (a fill that only
    moved rows on would get each of them wrong). And `forget` makes the next fill write every
    row."""
    rng = random.Random(0)
    pool = list(range(100, 400))
    inputs = DecodeInputs(rows=8, width=16, block_size=BLOCK, device="cpu")
    inputs.fill(random_sequences(7, 2), 8, True)  # rows 5-7 hold real rows: "size" must clear them
    seqs = random_sequences(5, 3)
    inputs.fill(seqs, 6, True)
    for change in ("reorder", "drop", "reallocate", "two tokens", "repaged", "wider", "size",
                   "full_tables"):
        size, full_tables = 6, True
        grow(seqs, rng, pool)
        if change == "reorder":
            seqs = seqs[1:] + seqs[:1]
        elif change == "drop":
            seqs = seqs[:-1]
        elif change == "reallocate":
            seqs[1].block_table = [pool.pop() for _ in seqs[1].block_table]
        elif change == "two tokens":
            grow(seqs, rng, pool)
        elif change == "repaged":  # two tokens on, its last page another, in place (a verify
            # step's rollback then a page taken: never a one-token step, see _advance)
            # one whose last token did not start its page (its table as the last fill saw it)
            seq = next(s for s in seqs if s.num_tokens % BLOCK not in (0, 1))
            seq.append(0)
            seq.block_table[-1] = pool.pop()
        elif change == "wider":  # pages past its tokens' (a speculative step's reservation)
            widest = max(len(s.block_table) for s in seqs)
            seqs[2].block_table += [pool.pop()
                                    for _ in range(widest + 1 - len(seqs[2].block_table))]
        elif change == "size":
            size = 8
        else:
            full_tables = False
        inputs.fill(seqs, size, full_tables)
        assert_inputs(inputs, seqs, size, full_tables)
        inputs.fill(seqs, size, full_tables)  # the same lengths again: not one token further
        assert_inputs(inputs, seqs, size, full_tables)
    writes = []
    inputs._write = lambda *args, original=inputs._write: (writes.append(1), original(*args))
    inputs.forget()
    grow(seqs, rng, pool)
    inputs.fill(seqs, size, full_tables)
    assert writes == [1]

"""Block bookkeeping: allocation, reference counts, prefix sharing, freeing."""
import pytest

from fusedrl.engine.inference.block_manager import BlockManager
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.sequence import Sequence


def seq(tokens, seq_id=0):
    return Sequence(seq_id, Request(tokens, SamplingParams()), seed=0)


def test_allocate_covers_every_token_and_deallocate_frees_all():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = seq(list(range(10)))  # 10 tokens -> 3 blocks
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert bm.num_free_blocks == 5 and s.num_cached_tokens == 0
    bm.deallocate(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and bm.key_to_block == {}


def test_samples_of_one_prompt_share_full_prompt_blocks():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(100, 110))  # 10 tokens: blocks [0-3] [4-7] shareable, [8-9] private
    samples = [seq(prompt, i) for i in range(4)]
    for s in samples:
        bm.allocate(s)
    first = samples[0].block_table
    for s in samples[1:]:
        assert s.block_table[:2] == first[:2] and s.num_cached_tokens == 8
        assert s.block_table[2] != first[2]  # the block the last prompt token is written to
    assert samples[0].num_cached_tokens == 0
    assert [bm.ref_counts[b] for b in first[:2]] == [4, 4]
    assert bm.num_free_blocks == 16 - 2 - 4  # two shared blocks + one private block each
    for s in samples:
        bm.deallocate(s)
    assert bm.num_free_blocks == 16 and all(c == 0 for c in bm.ref_counts)


def test_a_block_ending_at_the_last_token_is_not_shared():
    # 8 tokens = exactly two blocks; the second holds the last token, which each sequence feeds
    # (and writes) itself, so only the first block is shared.
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(list(range(8)), 0), seq(list(range(8)), 1)
    bm.allocate(a)
    bm.allocate(b)
    assert a.block_table[0] == b.block_table[0] and a.block_table[1] != b.block_table[1]
    assert b.num_cached_tokens == 4


def test_sharing_stops_at_the_first_differing_block():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], 0)
    b = seq([1, 2, 3, 4, 0, 6, 7, 8, 9, 10, 11, 12, 13], 1)  # differs in block 1, equal in block 2
    bm.allocate(a)
    bm.allocate(b)
    assert b.block_table[0] == a.block_table[0]
    assert not set(b.block_table[1:]) & set(a.block_table)
    assert b.num_cached_tokens == 4


def test_freed_blocks_are_forgotten_so_stale_kv_is_never_reused():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(9)), 0)
    bm.allocate(a)
    bm.deallocate(a)
    b = seq(list(range(9)), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_shared_blocks_survive_until_the_last_holder_leaves():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(list(range(9)), 0), seq(list(range(9)), 1)
    bm.allocate(a)
    bm.allocate(b)
    shared = a.block_table[:2]
    bm.deallocate(a)
    assert all(bm.ref_counts[x] == 1 for x in shared) and bm.num_free_blocks == 8 - 3  # b: 2 shared + 1 own
    c = seq(list(range(9)), 2)  # still shares b's live prefix
    bm.allocate(c)
    assert c.block_table[:2] == shared


def test_can_allocate_counts_shared_blocks_as_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq(list(range(9)), 0)  # 3 blocks, 2 shareable
    bm.allocate(a)
    b = seq(list(range(9)), 1)  # needs only 1 new block
    assert bm.num_free_blocks == 1 and bm.can_allocate(b)
    assert not bm.can_allocate(seq(list(range(50, 59)), 2))


def test_append_slot_takes_a_block_only_when_a_token_starts_one():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq([1, 2, 3, 4])
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.append(5)  # token 5 starts block 2
    assert bm.append_slot(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    s.append(6)
    assert bm.append_slot(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2


def test_append_slot_takes_nothing_when_the_pool_is_empty():
    bm = BlockManager(num_blocks=2, block_size=4)
    s = seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.allocate(s)
    assert bm.num_free_blocks == 0
    s.append(9)  # starts a third block: none free
    assert not bm.append_slot(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 0
    s.token_ids.pop()
    s.token_ids[-1] = 0  # the last token inside the second block: its slot is there
    assert bm.append_slot(s) and len(s.block_table) == 2


def test_append_slots_take_what_append_slot_would_in_order_or_nothing():
    """Every sequence's slot at once: the pages append_slot one by one would give, in the same
    order, when the free blocks cover those that need one; nothing taken when they do not."""
    tokens = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10], [11, 12, 13, 14, 15]]
    one, many = BlockManager(num_blocks=7, block_size=4), BlockManager(num_blocks=7, block_size=4)
    singly = [seq(t, i) for i, t in enumerate(tokens)]
    at_once = [seq(t, i) for i, t in enumerate(tokens)]
    for bm, seqs in ((one, singly), (many, at_once)):
        for s in seqs:
            bm.allocate(s)
            s.append(99)  # the first and third start a page; the others have room
    assert all(one.append_slot(s) for s in singly)
    assert many.append_slots(at_once)
    assert [s.block_table for s in at_once] == [s.block_table for s in singly]
    assert many.num_free_blocks == one.num_free_blocks == 0
    at_once[1].token_ids += [100, 101]  # its fifth token starts a page: none is free
    tables = [list(s.block_table) for s in at_once]
    assert not many.append_slots(at_once)
    assert [s.block_table for s in at_once] == tables and many.num_free_blocks == 0


def test_append_slots_ahead_take_the_next_token_s_page_which_append_slot_then_finds():
    """ahead=1 (a decode step launched before the one it continues is read): the page of the token
    after each sequence's last, for those whose next token starts one; once that token is
    appended, append_slot takes nothing more."""
    bm = BlockManager(num_blocks=4, block_size=4)
    full, room = seq([1, 2, 3, 4]), seq([5, 6])
    for s in (full, room):
        bm.allocate(s)
    assert bm.append_slots([full, room])  # each last token already has its slot
    assert bm.num_free_blocks == 2
    assert bm.append_slots([full, room], ahead=1)
    assert [len(s.block_table) for s in (full, room)] == [2, 1] and bm.num_free_blocks == 1
    for s in (full, room):
        s.append(7)
    assert bm.append_slot(full) and bm.append_slot(room) and bm.num_free_blocks == 1


def test_invalid_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 16)


def test_a_speculative_draft_reserves_slots_and_its_rejection_gives_them_back():
    bm = BlockManager(num_blocks=5, block_size=4)
    s = seq(list(range(6)))  # 2 blocks
    bm.allocate(s)
    assert bm.reserve(s, 6 + 5) == 11 and len(s.block_table) == 3   # a 5-token draft: 11 slots
    assert bm.reserve(s, 6 + 20) == 20 and bm.num_free_blocks == 0  # as far as free blocks last
    s.append(99)  # one token accepted: 7 tokens need 2 blocks
    bm.trim(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 3
    bm.deallocate(s)
    assert bm.num_free_blocks == 5

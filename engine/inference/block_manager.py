"""BlockManager: which KV-cache blocks each sequence holds, with reference counts and prefix
sharing.

Pure bookkeeping over block ids; the runner turns block tables into tensors.

Prefix sharing: a full block is keyed by (id of the block before it, the digest of the
sequence's images if any, its token ids). Two sequences with the same leading tokens (the n
samples of one prompt) therefore map those tokens to the same blocks, held once with a reference
count. Only *live* blocks are shared: a block whose count drops
to zero forgets its key, so K/V computed under older weights (the trainer updates them between
`generate` calls) is never reused. Blocks past the sequence's second-to-last token are never shared,
so the token fed to the model always has its own block to write into and there is no copy-on-write.
"""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[tuple | None] = [None] * num_blocks
        self.key_to_block: dict[tuple, int] = {}
        self.free_block_ids = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _shared_prefix(self, seq: Sequence) -> list[int]:
        """Live blocks holding the leading full blocks of `seq`, as far as they match."""
        shared, parent = [], -1
        # keep the last token's block private
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.key_to_block.get(self._key(seq, i, parent))
            if block_id is None:
                break
            shared.append(block_id)
            parent = block_id
        return shared

    def _key(self, seq: Sequence, i: int, parent: int) -> tuple:
        # The images' digest too: the same placeholder tokens over other pixels are other K/V.
        tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
        return parent, seq.image_key, tuple(tokens)

    def can_allocate(self, seq: Sequence) -> bool:
        needed = self.blocks_for(seq.num_tokens) - len(self._shared_prefix(seq))
        return needed <= self.num_free_blocks

    def allocate(self, seq: Sequence):
        """Give `seq` blocks for all its tokens, reusing shared prefix blocks. Call `can_allocate`
        first."""
        assert not seq.block_table, f"sequence {seq.seq_id} already holds blocks"
        shared = self._shared_prefix(seq)
        for block_id in shared:
            self.ref_counts[block_id] += 1
        seq.block_table = list(shared)
        seq.num_cached_tokens = len(shared) * self.block_size
        num_shareable = (seq.num_tokens - 1) // self.block_size
        for i in range(len(shared), self.blocks_for(seq.num_tokens)):
            block_id = self._take_free_block()
            if i < num_shareable:  # a full block of this sequence's prefix: let others share it
                key = self._key(seq, i, seq.block_table[-1] if seq.block_table else -1)
                self.block_keys[block_id] = key
                self.key_to_block[key] = block_id
            seq.block_table.append(block_id)

    def can_extend(self, seq: Sequence) -> bool:
        """Whether blocks for every token of a sequence that already holds some can be had."""
        return self.blocks_for(seq.num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def extend(self, seq: Sequence):
        """Blocks for the tokens appended to a sequence that kept its blocks (a multi-turn sequence
        between turns): its earlier K/V stay where they are. Call `can_extend` first."""
        for _ in range(len(seq.block_table), self.blocks_for(seq.num_tokens)):
            seq.block_table.append(self._take_free_block())

    def append_slot(self, seq: Sequence) -> bool:
        """Give the last token of `seq` (the next one fed to the model) a slot, taking a new block
        if it starts one; False, with nothing taken, when it needs a block and none is free."""
        if len(seq.block_table) * self.block_size >= seq.num_tokens:
            return True
        if not self.free_block_ids:
            return False
        seq.block_table.append(self._take_free_block())
        return True

    def append_slots(self, seqs, ahead: int = 0) -> bool:
        """append_slot for every sequence of `seqs`, in order, when the free blocks cover all that
        need one (a decode step's usual case: one pass, no call per sequence); False, with nothing
        taken, when they do not. ahead=1: the slot of the token after the last (a decode step
        launched before the step it continues is read: engine_loop.py), which the next
        append_slot finds taken."""
        size = self.block_size
        needing = [s for s in seqs if len(s.block_table) * size < len(s.token_ids) + ahead]
        if len(needing) > len(self.free_block_ids):
            return False
        for seq in needing:
            seq.block_table.append(self._take_free_block())
        return True

    def reserve(self, seq: Sequence, num_tokens: int) -> int:
        """Give `seq` slots up to `num_tokens` tokens (a speculative step's draft) as far as free
        blocks last; returns how many tokens it now has slots for."""
        while len(seq.block_table) < self.blocks_for(num_tokens) and self.free_block_ids:
            seq.block_table.append(self._take_free_block())
        return min(num_tokens, len(seq.block_table) * self.block_size)

    def trim(self, seq: Sequence):
        """Free the blocks past those `seq`'s tokens need (a rejected draft's), private to it: the
        rollback of a speculative step (their K/V is never read: attention reads num_tokens)."""
        while len(seq.block_table) > self.blocks_for(seq.num_tokens):
            block_id = seq.block_table.pop()
            self.ref_counts[block_id] -= 1
            assert self.ref_counts[block_id] == 0 and self.block_keys[block_id] is None
            self.free_block_ids.append(block_id)

    def deallocate(self, seq: Sequence):
        """Drop `seq`'s references; blocks nobody else holds are free at once."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                key = self.block_keys[block_id]
                if key is not None:
                    del self.key_to_block[key]
                    self.block_keys[block_id] = None
                self.free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def _take_free_block(self) -> int:
        if not self.free_block_ids:
            raise RuntimeError("no free KV-cache block (the scheduler should have checked)")
        block_id = self.free_block_ids.popleft()
        self.ref_counts[block_id] = 1
        return block_id

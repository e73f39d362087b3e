"""Scheduling policy, driven with fake sampled tokens (no model)."""
from fusedrl.engine.inference.block_manager import BlockManager
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.scheduler import Scheduler, StepKind
from fusedrl.engine.inference.sequence import Sequence, SequenceStatus

EOS = 2


def make(num_blocks=16, block_size=4, max_num_seqs=8, max_tokens=64, max_model_len=64):
    bm = BlockManager(num_blocks, block_size)
    return bm, Scheduler(bm, max_num_seqs, max_tokens, max_model_len, (EOS,))


def add(sched, seq_id, n_prompt, **params):
    s = Sequence(seq_id, Request(range(10, 10 + n_prompt), SamplingParams(**params)), seed=seq_id)
    sched.add(s)
    return s


def step(sched, token=7):
    batch, kind = sched.schedule()
    finished = sched.postprocess(batch, [token] * len(batch))
    return batch, kind is not StepKind.DECODE, finished


def test_prefill_then_decode_and_new_requests_join_the_running_batch():
    bm, sched = make()
    a = add(sched, 0, 5, max_new_tokens=3)
    batch, is_prefill, _ = step(sched)
    assert is_prefill and batch == [a]
    batch, is_prefill, _ = step(sched)
    assert not is_prefill and batch == [a]
    b = add(sched, 1, 3, max_new_tokens=3)
    batch, is_prefill, _ = step(sched)  # admission goes first, then both decode together
    assert is_prefill and batch == [b]
    batch, is_prefill, finished = step(sched)
    assert batch == [a, b] and finished == [a] and a.finish_reason == "length"
    assert a.completion_token_ids == [7, 7, 7] and a.block_table == []


def test_the_scheduler_says_each_step_s_kind_chunks_taking_turns_with_decode_steps():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, 8, 64, 64, (EOS,), prefill_chunk=4)
    short, long = add(sched, 0, 3, max_new_tokens=5), None
    kinds = []
    for _ in range(7):
        if len(kinds) == 2:
            long = add(sched, 1, 10, max_new_tokens=5)
        batch, kind = sched.schedule()
        kinds.append(kind)
        if kind is StepKind.CHUNK:
            assert batch == [long]
            sched.chunk_done(long)
        else:
            sched.postprocess(batch, [7] * len(batch))
    # the long prompt's first chunk, then its chunks and the short one's decode steps alternate;
    # its last chunk is a PREFILL (its first token drawn)
    assert kinds == [StepKind.PREFILL, StepKind.DECODE, StepKind.CHUNK, StepKind.DECODE,
                     StepKind.CHUNK, StepKind.DECODE, StepKind.PREFILL]
    assert short.num_tokens == 3 + 4 and long.num_tokens == 11


def test_finish_on_eos_stop_token_and_length_frees_blocks_at_once():
    bm, sched = make()
    eos = add(sched, 0, 4, max_new_tokens=10)
    stop = add(sched, 1, 4, max_new_tokens=10, stop_token_ids=(9,))
    ignore = add(sched, 2, 4, max_new_tokens=10, ignore_eos=True)
    batch, _ = sched.schedule()
    finished = sched.postprocess(batch, [EOS, 9, EOS])
    assert finished == [eos, stop] and eos.finish_reason == stop.finish_reason == "stop"
    assert bm.num_free_blocks == 16 - len(ignore.block_table)
    assert list(sched.running) == [ignore] and ignore.status is SequenceStatus.RUNNING


def test_context_length_ends_a_sequence():
    bm, sched = make(max_model_len=8)
    s = add(sched, 0, 6, max_new_tokens=100)
    for _ in range(2):
        step(sched)
    assert s.is_finished and s.finish_reason == "length" and s.num_tokens == 8


def test_admission_respects_max_num_seqs_and_token_budget():
    _, sched = make(max_num_seqs=2, max_tokens=64)
    seqs = [add(sched, i, 4, max_new_tokens=5) for i in range(3)]
    batch, _, _ = step(sched)
    assert batch == seqs[:2]
    _, sched = make(max_tokens=10)
    seqs = [add(sched, i, 4, max_new_tokens=5) for i in range(3)]
    batch, _, _ = step(sched)
    assert batch == seqs[:2]  # 4 + 4 <= 10 < 4 + 4 + 4


def test_pool_exhaustion_preempts_the_newest_and_everything_finishes():
    # 5 blocks of 4: two 4-token prompts each grow to 12 tokens (3 blocks); both need 6 blocks, so
    # the newest is preempted and recomputed once the other finishes.
    bm, sched = make(num_blocks=5, block_size=4)
    a = add(sched, 0, 4, max_new_tokens=8)
    b = add(sched, 1, 4, max_new_tokens=8)
    steps = 0
    while not sched.is_finished():
        step(sched)
        steps += 1
        assert steps < 100
    assert sched.num_preemptions > 0
    assert a.completion_token_ids == [7] * 8 and b.completion_token_ids == [7] * 8
    assert bm.num_free_blocks == 5 and all(c == 0 for c in bm.ref_counts)

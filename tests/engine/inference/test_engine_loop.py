"""The engine's one loop (engine_loop.py): requests added and stepped by hand give generate's
tokens, stop rules compose over a run (a token budget, groups done), and the on_end hook pauses a
finished turn and resumes it with token ids, at once or from a Future."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fusedrl.engine.inference.block_manager import BlockManager
from fusedrl.engine.inference.drafts import Drafts
from fusedrl.engine.inference.engine_loop import EngineLoop
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.runner import ModelRunner
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.scheduler import Scheduler, StepKind
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.inference.stop_rules import GroupsDone, TokenBudget, first_of
from engine_testing import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
PROMPTS = random_prompts([7, 3, 11], seed=4)


@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, kv_cache_memory=1 << 22, block_size=4, prefill_chunk=5,
               speculative_tokens=2)


def test_added_and_stepped_requests_are_generate_s(llm):
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    seqs = [llm.add(Request(p, GREEDY), i) for i, p in enumerate(PROMPTS)]
    kinds = []
    schedule = llm.scheduler.schedule

    def spied():  # which kinds the scheduler said
        batch, kind = schedule()
        kinds.append(kind)
        return batch, kind
    llm.scheduler.schedule = spied
    try:
        while not all(s.is_finished for s in seqs):
            assert llm.step() is not None
    finally:
        del llm.scheduler.schedule
    assert [s.completion_token_ids for s in seqs] == expected
    # the 11-token prompt's chunks, the others' prefill, decode steps (speculative on the tail)
    assert {StepKind.CHUNK, StepKind.PREFILL, StepKind.DECODE} <= set(kinds)
    assert sum(len(s.logprob_slots) for s in seqs) == llm.runner.logprobs_kept == 18
    assert llm.step() is None  # nothing queued


def test_an_engine_loop_runs_on_the_parts_it_is_given(llm, qwen2_dir):
    """EngineLoop(scheduler, blocks, runner, drafts) built by hand: LLM's tokens and log-probs,
    speculative verify steps counted by its drafts."""
    sampled = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3)
    llm.take_speculation()
    expected = [c for o in llm.generate(PROMPTS, sampled) for c in o.outputs]
    speculation = llm.take_speculation()
    model = load_model(qwen2_dir, device="cpu")
    max_len, blocks = model.config.max_model_len, llm.block_manager.num_blocks
    manager = BlockManager(blocks, 4)
    loop = EngineLoop(Scheduler(manager, 256, 16384, max_len, model.config.eos_token_ids, 5),
                      manager, ModelRunner(model, blocks, 4, 256, False),
                      Drafts(2, 8, manager, max_len))
    seqs = loop.run([Request(p, sampled) for p in PROMPTS])
    assert [s.completion_token_ids for s in seqs] == [c.token_ids for c in expected]
    assert [s.logprobs for s in seqs] == [c.logprobs for c in expected]
    assert loop.drafts.take() == speculation


def test_stop_rules_compose_and_stop_the_unfinished(llm):
    long = SamplingParams(temperature=0.0, max_new_tokens=40)
    requests = [Request(p, long, sample_index=j) for p in PROMPTS for j in range(2)]
    # A budget of 9 tokens: the step that passes it is the last (a step draws at most a token a
    # row; the tail's speculative steps, more).
    seqs = llm.run(requests, TokenBudget(9))
    drawn = sum(len(s.logprob_slots) for s in seqs)
    assert 9 <= drawn < 9 + 6 * 3 and drawn == llm.runner.logprobs_kept
    assert all(s.finish_reason is None for s in seqs) and llm.block_manager.num_free_blocks == \
        llm.block_manager.num_blocks
    # Groups done: rows 0-1 (group 0) end at 3 tokens, the others run to 40; the budget is larger.
    short = SamplingParams(temperature=0.0, max_new_tokens=3)
    requests = [Request(PROMPTS[0], short, sample_index=j) for j in range(2)] + requests[2:]
    groups = [0, 0, 1, 1, 2, 2]
    seqs = llm.run(requests, first_of(TokenBudget(1000), GroupsDone(groups, 1)))
    assert [s.finish_reason for s in seqs] == ["length", "length"] + [None] * 4
    assert all(len(s.completion_token_ids) < 40 for s in seqs[2:])
    with pytest.raises(ValueError, match="groups_needed=0"):
        GroupsDone(groups, 0)


def test_on_end_resumes_a_finished_turn_at_once_or_from_a_future(llm):
    turns = {}

    def on_end(index, seq):
        turns[index] = turns.get(index, 0) + 1
        if turns[index] == 3:
            return None
        reply = [20 + index, 21, 22]
        if index == 1:  # a Future from a worker, rejoining when nothing else can run
            return pool.submit(lambda: (time.sleep(0.05), reply)[1])
        return reply
    requests = [Request(p, SamplingParams(temperature=0.0, max_new_tokens=4)) for p in PROMPTS]
    with ThreadPoolExecutor(2) as pool:
        seqs = llm.run(requests, on_end=on_end)
    assert turns == {0: 3, 1: 3, 2: 3}
    for i, seq in enumerate(seqs):
        ids = seq.completion_token_ids
        assert len(ids) == 3 * 4 + 2 * 3 and ids[4:7] == ids[11:14] == [20 + i, 21, 22]
        assert len(seq.logprob_slots) == 12 and seq.finish_reason == "length"
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    # A turn is what one request of the tokens before it draws.
    for prompt, seq in zip(PROMPTS, seqs):
        again = llm.generate(prompt + seq.completion_token_ids[:7],
                             SamplingParams(temperature=0.0, max_new_tokens=4))
        assert again[0].outputs[0].token_ids == seq.completion_token_ids[7:11]


def test_a_run_refuses_while_requests_are_in_flight(llm):
    seq = llm.add(Request(PROMPTS[0], GREEDY))
    with pytest.raises(RuntimeError, match="in flight"):
        llm.run([Request(PROMPTS[1], GREEDY)])
    while not seq.is_finished:
        llm.step()
    with pytest.raises(TypeError, match=r"requests\[0\] must be a Request"):
        llm.run([PROMPTS[0]])


def test_a_hook_s_error_leaves_the_engine_idle_for_the_next_run(llm):
    def failing(index, seq):
        raise KeyError("the environment broke")
    with pytest.raises(KeyError, match="the environment broke"):
        llm.run([Request(p, GREEDY) for p in PROMPTS], on_end=failing)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks
    expected = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert [s.completion_token_ids for s in llm.run([Request(p, GREEDY) for p in PROMPTS])] == expected


def small_pool(qwen2_dir, blocks: int) -> LLM:
    """An LLM whose KV pool holds `blocks` blocks of 4 tokens."""
    from fusedrl.engine.inference.runner import kv_bytes_per_block
    config = LLM(qwen2_dir, kv_cache_memory=1 << 20).config
    return LLM(qwen2_dir, block_size=4, kv_cache_memory=blocks * kv_bytes_per_block(
        config, torch.float32, 4))


@pytest.mark.parametrize("blocks", [14, 15])
def test_turns_resumed_together_in_a_small_pool_all_run_to_their_end(qwen2_dir, blocks):
    """Turns resumed in one step wait for admission with the blocks of their earlier turns; where
    those hold the pool the queue's head needs, they are freed (recomputed when they run), as
    paused ones are: every trajectory ends, every block is free."""
    turns = {}

    def on_end(index, seq):  # three turns, replies of 2 to 5 tokens
        turns[index] = turns.get(index, 0) + 1
        return None if turns[index] == 3 else [20 + index] * (2 + (index + turns[index]) % 4)
    prompts = random_prompts([9, 4, 11, 6, 3], seed=5)
    llm = small_pool(qwen2_dir, blocks)
    seqs = llm.run([Request(p, SamplingParams(temperature=0.0, max_new_tokens=4)) for p in prompts],
                   on_end=on_end)
    assert turns == {i: 3 for i in range(5)} and all(s.finish_reason == "length" for s in seqs)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_trajectory_grown_past_the_pool_says_so(qwen2_dir):
    """A request's first turn is checked at admission; a later turn that makes it longer than the
    whole pool (8 blocks of 4 tokens) is a one-line error naming it, not a silent stall."""
    llm = small_pool(qwen2_dir, 8)
    request = Request(PROMPTS[2], SamplingParams(temperature=0.0, max_new_tokens=4))
    # 11 prompt tokens, turns of 4, replies of 10: the third turn's prefill needs 39 tokens
    with pytest.raises(RuntimeError, match=r"request sequence \d+ has grown to 39 tokens over its "
                                           r"turns \(10 blocks\), more than the KV pool holds \(8 "
                                           r"blocks of 4 tokens\)"):
        llm.run([request], on_end=lambda index, seq: [30] * 10)
    assert llm.block_manager.num_free_blocks == 8


def test_a_stop_frees_the_blocks_of_turns_resumed_and_not_yet_admitted(llm):
    """A token budget stops a run while resumed turns wait with the blocks of their earlier turns:
    those are freed too, their prefix keys forgotten (K/V of these weights is never shared with a
    later run)."""
    requests = [Request(p, SamplingParams(temperature=0.0, max_new_tokens=3)) for p in PROMPTS]
    for budget in (11, 26):
        llm.run(requests, TokenBudget(budget), on_end=lambda index, seq: [20 + index, 21, 22])
        bm = llm.block_manager
        assert bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts)
        assert not bm.key_to_block

"""Decode steps launched ahead (engine_loop.py's overlap): the next decode step is launched before
the one it continues is read, its input ids that step's draws on the device. Run on the CPU by
forcing it on (LLM's default is on a GPU only), on the eager step and on the graph path's buffers
replayed eagerly, it must give what one step at a time gives: the same tokens, log-probs, finish
reasons and freed blocks, through sequences ending at different steps (stop tokens, lengths),
pages filling, shared prefixes, preemption, pausing turns, stop rules and a graph's padding rows."""
import pytest
import torch

from fusedrl.engine.inference.decode_graphs import DecodeGraphs
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.request import Request
from fusedrl.engine.inference.runner import kv_bytes_per_block
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.stop_rules import TokenBudget
from engine_testing import make_cycle_model, make_tokenizer, random_prompts

PROMPTS = random_prompts([7, 3, 11, 5, 9], seed=6)


def engine(path, overlap: bool, graphs: bool = False, **kwargs) -> LLM:
    """An LLM on the CPU with overlap_decode forced; graphs: the decode graphs' buffers and
    padding rows, replayed eagerly. Counts the steps launched ahead in `llm.launched_ahead`, and
    in `llm.gathered` those whose rows are fewer than the step's before (some ended there)."""
    llm = LLM(path, block_size=4, max_num_seqs=kwargs.pop("max_num_seqs", 8),
              overlap_decode=overlap, **kwargs)
    if graphs:
        llm.runner.graphs = DecodeGraphs(llm.runner, max_num_seqs=llm.scheduler.max_num_seqs,
                                         capture=False)
    launch, llm.launched_ahead = llm.runner.launch, 0

    def counted(seqs, is_prefill, staged=False, previous=None):
        llm.launched_ahead += previous is not None
        return launch(seqs, is_prefill, staged=staged, previous=previous)
    llm.runner.launch = counted
    draws_at, llm.gathered = llm.runner.draws_at, 0

    def gathered(step, rows):
        llm.gathered += len(rows) < len(step.seqs)
        return draws_at(step, rows)
    llm.runner.draws_at = gathered
    return llm


def completions(outputs):
    return [(c.token_ids, c.finish_reason) for o in outputs for c in o.outputs]


def logprobs(outputs):
    return [lp for o in outputs for c in o.outputs for lp in c.logprobs]


def all_free(llm: LLM) -> bool:
    bm = llm.block_manager
    return bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts) and not bm.key_to_block


def mixed_params(stop_token_ids=()):
    """Sampled rows (two samples a prompt: shared prefixes) ending at different steps: lengths
    from 2 to 23 tokens, and stop tokens where given."""
    return [SamplingParams(temperature=1.0, seed=i, n=2, max_new_tokens=n,
                           stop_token_ids=list(stop_token_ids))
            for i, n in enumerate([23, 2, 14, 9, 17])]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph_buffers"])
def test_steps_launched_ahead_draw_what_one_step_at_a_time_draws(qwen2_dir, graphs):
    plain, ahead = engine(qwen2_dir, False, graphs), engine(qwen2_dir, True, graphs)
    # stop tokens the model draws now and then: rows end early, at steps of their own
    drawn = completions(plain.generate(PROMPTS, mixed_params()))
    common = sorted({t for ids, _ in drawn for t in ids}, key=lambda t: -sum(
        ids.count(t) for ids, _ in drawn))[:3]
    for params in (mixed_params(), mixed_params(common)):
        want, got = plain.generate(PROMPTS, params), ahead.generate(PROMPTS, params)
        assert completions(got) == completions(want)
        torch.testing.assert_close(logprobs(got), logprobs(want), rtol=1e-5, atol=1e-5)
        assert all_free(ahead)
    assert {r for _, r in completions(got)} == {"stop", "length"}
    assert plain.launched_ahead == 0 and ahead.launched_ahead > 20 and ahead.gathered > 0


def test_the_speculative_tail_drafts_and_the_steps_before_it_go_ahead(tmp_path):
    """speculative_tokens beside overlap, on a model whose text repeats (its n-grams draft): decode
    steps of 4 rows or more go ahead, the tail's (fewer rows) draft and verify: the same tokens
    (a draw is the target's either way). The first step with fewer rows may be one launched ahead
    of the step that ended them, a plain step: it drafts nothing."""
    make_cycle_model().save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(tmp_path)
    plain, ahead = (engine(tmp_path, overlap, speculative_tokens=2, speculate_below=4)
                    for overlap in (False, True))
    prompts = [[12, 13, 14], [40, 41], [100]]
    params = [SamplingParams(n=2, temperature=1.0, seed=i, max_new_tokens=n)
              for i, n in enumerate([30, 12, 21])]
    want, got = plain.generate(prompts, params), ahead.generate(prompts, params)
    assert completions(got) == completions(want)
    torch.testing.assert_close(logprobs(got), logprobs(want), rtol=1e-4, atol=1e-4)
    alone, beside = plain.take_speculation(), ahead.take_speculation()
    assert 0 < beside["drafted"] <= alone["drafted"] and beside["accepted"] > 0
    assert ahead.launched_ahead > 0 and all_free(ahead)


def test_no_step_goes_ahead_without_a_free_block_and_preemption_still_recomputes(qwen2_dir):
    """A pool of 12 blocks: rows are preempted and recomputed, and a step whose rows need a page
    that is not free is read before the next is launched."""
    small = kv_bytes_per_block(LLM(qwen2_dir, kv_cache_memory=1 << 20).config, torch.float32, 4)
    plain, ahead = (engine(qwen2_dir, overlap, kv_cache_memory=12 * small)
                    for overlap in (False, True))
    params = SamplingParams(temperature=0, max_new_tokens=20)
    want = plain.generate(PROMPTS, params)
    assert completions(ahead.generate(PROMPTS, params)) == completions(want)
    assert ahead.scheduler.num_preemptions == plain.scheduler.num_preemptions > 0
    assert ahead.launched_ahead > 0 and all_free(ahead)


def test_paused_turns_and_stop_rules_with_steps_launched_ahead(qwen2_dir):
    plain, ahead = engine(qwen2_dir, False), engine(qwen2_dir, True)

    def on_end(index, seq):  # turns of 4 tokens, an environment's 3 tokens between them
        return None if seq.num_tokens - seq.num_prompt_tokens >= 18 else [20 + index, 21, 22]
    requests = [Request(p, SamplingParams(temperature=0.0, max_new_tokens=4)) for p in PROMPTS]
    want = plain.run(requests, on_end=on_end)
    seqs = ahead.run(requests, on_end=on_end)
    assert [s.completion_token_ids for s in seqs] == [s.completion_token_ids for s in want]
    assert [len(s.completion_token_ids) for s in seqs] == [24, 18, 18, 18, 18]  # 3 turns, 5 on 0
    torch.testing.assert_close([s.logprobs for s in seqs], [s.logprobs for s in want], rtol=1e-5,
                               atol=1e-5)
    assert all_free(ahead)
    # A token budget stops the run where one step at a time stops it: a step launched ahead of
    # the stop is never read.
    long = [Request(p, SamplingParams(temperature=0.0, max_new_tokens=40)) for p in PROMPTS]
    want = plain.run(long, TokenBudget(37))
    got = ahead.run(long, TokenBudget(37))
    assert [s.completion_token_ids for s in got] == [s.completion_token_ids for s in want]
    assert [s.finish_reason for s in got] == [None] * len(PROMPTS) and all_free(ahead)
    assert ahead.launched_ahead > 0


def test_a_step_launched_ahead_is_read_by_the_next_step_and_dropped_when_its_rows_end(qwen2_dir):
    """Stepped by hand: a lone row that draws its stop token third runs its prefill, then a decode
    step that launches the next, which the following step() reads after launching another; that
    read ends the row, and the step launched ahead of it is dropped: the engine is idle, every
    block free. A row that ends by its length launches nothing past its last step."""
    llm = engine(qwen2_dir, True)
    drawn = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=3))
    first, second, third = drawn[0].outputs[0].token_ids
    assert third not in (first, second)
    seq = llm.add(Request(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=10,
                                                      stop_token_ids=[third])))
    llm.launched_ahead, kept, steps = 0, llm.runner.logprobs_kept, 0
    while not seq.is_finished:
        assert llm.step() is not None
        steps += 1
    assert seq.completion_token_ids == [first, second, third] and seq.finish_reason == "stop"
    assert steps == 3 and llm.launched_ahead == 2 and not llm.reads_ahead
    assert llm.scheduler.is_finished() and all_free(llm)
    assert llm.runner.logprobs_kept - kept == 4  # three kept, one a wasted row of the dropped step
    assert seq.logprob_slots == [kept, kept + 1, kept + 2]
    # by length: its last decode step (the third token) is the one launched ahead, none after it
    llm.launched_ahead = 0
    llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=3))
    assert llm.launched_ahead == 1


def test_overlap_decode_defaults_to_the_gpu_and_refuses_a_non_bool(qwen2_dir):
    assert LLM(qwen2_dir, kv_cache_memory=1 << 20).overlap is False  # the CPU
    with pytest.raises(ValueError, match="overlap_decode='yes'"):
        LLM(qwen2_dir, kv_cache_memory=1 << 20, overlap_decode="yes")

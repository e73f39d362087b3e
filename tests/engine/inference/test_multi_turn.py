"""Multi-turn generation (multi_turn.py): a turn's end pauses the sequence with its KV kept, the
environment's tokens are appended as given and only they are prefilled; the trajectories equal a
turn-by-turn recomputation from scratch (greedy), whatever the pool's size, with futures too."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.runner import kv_bytes_per_block
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.multi_turn import TurnReply
from engine_testing import VOCAB, random_prompts

# About one token in seven ends a turn: every trajectory takes a few short turns.
STOPS = tuple(t for t in range(10, VOCAB) if t % 7 == 0)
GREEDY = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=STOPS)
PROMPTS = random_prompts([5, 11, 3], seed=4)


def observation(row, turn):
    """The scripted environment's reply to turn `turn` of trajectory `row` (longer than a turn)."""
    return [10 + (row * 31 + turn * 17 + k) % 200 for k in range(9 + row)]


def scripted(max_turns=3):
    """on_turn_end for an environment that answers each turn and ends after `max_turns` turns."""
    seen = {}

    def on_turn_end(row, turn_tokens):
        turn = seen[row] = seen.get(row, 0) + 1
        return TurnReply(done=True) if turn == max_turns else TurnReply(tuple(observation(row, turn)))
    return on_turn_end


def recomputed(llm, prompt, row, max_turns=3):
    """The same trajectory by single-turn generates from the whole history each time."""
    history, tokens, mask = list(prompt), [], []
    for turn in range(1, max_turns + 1):
        out = llm.generate([history], GREEDY)[0].outputs[0]
        tokens += out.token_ids
        mask += [True] * len(out.token_ids)
        if turn == max_turns:
            break
        obs = observation(row, turn)
        history += out.token_ids + obs
        tokens += obs
        mask += [False] * len(obs)
    return tokens, mask


@pytest.fixture(scope="module")
def expected(qwen2_dir):
    llm = LLM(qwen2_dir, dtype="float32", block_size=4)
    return [recomputed(llm, prompt, row) for row, prompt in enumerate(PROMPTS)]


@pytest.mark.parametrize("kv_blocks", [None, 40])  # roomy, and so small that paused blocks are lent
def test_turns_equal_the_turn_by_turn_recomputation(qwen2_dir, expected, kv_blocks):
    llm = LLM(qwen2_dir, dtype="float32", block_size=4,
              kv_cache_memory=None if kv_blocks is None else kv_blocks * _block_bytes(qwen2_dir))
    if kv_blocks is not None:
        assert llm.block_manager.num_blocks == kv_blocks
    trajectories = llm.generate_turns(PROMPTS, GREEDY, scripted(), max_turns=5)
    for trajectory, prompt, (tokens, mask) in zip(trajectories, PROMPTS, expected):
        assert trajectory.prompt_token_ids == prompt
        assert trajectory.token_ids == tokens and trajectory.model_mask == mask
        assert len(trajectory.logprobs) == len(tokens)
        assert all(lp == 0.0 for lp, m in zip(trajectory.logprobs, mask) if not m)
        assert len(trajectory.logprob_slots) == sum(mask)
    assert sum(t.turns for t in trajectories) > len(PROMPTS)  # the script really took turns
    bm = llm.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_earlier_turns_are_not_prefilled_again(qwen2_dir):
    llm = LLM(qwen2_dir, dtype="float32", block_size=4)
    for t in llm.generate_turns(PROMPTS, GREEDY, scripted(), max_turns=5):
        environment = t.model_mask.count(False)
        resumes = t.turns - 1
        # The prompt once, then per resumed turn its observation and the one sampled token before it.
        assert t.prefilled_tokens == len(t.prompt_token_ids) + environment + resumes


def test_futures_let_the_others_decode_while_one_waits(qwen2_dir, expected):
    llm = LLM(qwen2_dir, dtype="float32", block_size=4)
    script = scripted()
    order = []

    def slow_step(row, turn_tokens):
        order.append(row)
        time.sleep(0.05 if row == 0 else 0.0)
        return script(row, turn_tokens)

    with ThreadPoolExecutor(2) as pool:
        trajectories = llm.generate_turns(PROMPTS, GREEDY, lambda r, t: pool.submit(slow_step, r, t),
                                          max_turns=5)
    assert [(t.token_ids, t.model_mask) for t in trajectories] == expected


def test_limits_end_trajectories(qwen2_dir):
    llm = LLM(qwen2_dir, dtype="float32", block_size=4)
    one = llm.generate_turns(PROMPTS, GREEDY, scripted(max_turns=9), max_turns=1)
    assert all(t.turns == 1 and all(t.model_mask) for t in one)
    assert all(t.finish_reason in ("max_turns", "length") for t in one)
    capped = llm.generate_turns(PROMPTS, GREEDY, scripted(max_turns=9), max_turns=9, max_total_tokens=40)
    assert all(len(t.prompt_token_ids) + len(t.token_ids) <= 40 for t in capped)
    with pytest.raises(ValueError, match="max_turns=0"):
        llm.generate_turns(PROMPTS, GREEDY, scripted(), max_turns=0)


def _block_bytes(model_dir):
    llm = LLM(model_dir, dtype="float32", block_size=4)
    return kv_bytes_per_block(llm.config, torch.float32, 4)


@pytest.mark.parametrize("slow_rows", [(0,), (1, 2)])
def test_when_an_environment_answers_does_not_change_the_trajectories(qwen2_dir, slow_rows):
    # Sampled, not greedy: a step's rounding depends on which sequences share it, and a draw can
    # follow that rounding. Replies that come late or at once must give the same trajectories, bit
    # for bit (a seed's run is reproducible whatever its environments' timing).
    params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=STOPS, seed=3, n=2)
    llm = LLM(qwen2_dir, dtype="float32", block_size=4)

    def run(delayed):
        script = scripted()

        def step(row, turn_tokens):
            time.sleep(0.05 if row in delayed else 0.0)
            return script(row, turn_tokens)
        with ThreadPoolExecutor(4) as pool:
            out = llm.generate_turns(PROMPTS, params, lambda r, t: pool.submit(step, r, t),
                                     max_turns=5)
        return [(t.token_ids, t.model_mask, t.logprobs, t.turns) for t in out]
    assert run(()) == run(slow_rows)


def test_a_stop_rule_stops_trajectories_where_the_model_speaks_next(qwen2_dir):
    """Row 0's environment ends it at its first turn, which completes one group: the run stops,
    and rows 1 and 2, waiting for their replies then, keep the replies (not prefilled) and stop."""
    from fusedrl.engine.inference.stop_rules import GroupsDone
    params = SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True)

    def on_turn_end(row, turn_tokens):
        if row == 0:
            return TurnReply(done=True)
        return pool.submit(lambda: (time.sleep(0.05), TurnReply(tuple(observation(row, 1))))[1])
    llm = LLM(qwen2_dir, kv_cache_memory=1 << 22, block_size=4)
    with ThreadPoolExecutor(2) as pool:
        trajectories = llm.generate_turns(PROMPTS, params, on_turn_end, max_turns=5,
                                          stop=GroupsDone([0, 1, 2], 1))
    assert [t.finish_reason for t in trajectories] == ["done", None, None]
    assert [t.turns for t in trajectories] == [1, 1, 1]
    for row, t in enumerate(trajectories[1:], start=1):
        assert t.token_ids[4:] == observation(row, 1) and t.model_mask == [True] * 4 + [False] * (9 + row)
        assert len(t.logprob_slots) == 4
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks

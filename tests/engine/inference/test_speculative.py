"""Speculative decoding for the tail (ModelRunner.verify, ngram_draft.py): the same tokens and
log-probs as plain decoding, greedy and sampled, the target's distribution (a chi-square over many
draws), fewer forwards on repetitive text, and the KV blocks of rejected drafts given back; and
chunked prefill (Scheduler.prefill_chunk) equal to one-piece prefill."""
import pytest
import torch

from fusedrl.engine import cli
from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.ngram_draft import NgramIndex
from fusedrl.engine.inference.sampling_params import SamplingParams
from engine_testing import make_cycle_model, make_tokenizer, sample_responses

CYCLE_PROMPTS = [[12, 13, 14], [40, 41], [100]]


def save(model, path):
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cycle_dir(tmp_path_factory):
    return save(make_cycle_model(), tmp_path_factory.mktemp("cycle"))


def run(model_dir, prompts, params, **engine):
    llm = LLM(model_dir, kv_cache_memory=1 << 22, block_size=4, **engine)
    outputs = llm.generate(prompts, params)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks  # all given back
    run.speculation = llm.take_speculation()
    assert llm.take_speculation() == {"drafted": 0, "accepted": 0}  # counted since the last take
    return [c for o in outputs for c in o.outputs], llm.runner.forwards


def test_ngram_drafts_follow_the_latest_earlier_occurrence():
    index = NgramIndex()
    assert index.draft([5], 3) == []
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 1, 2]
    assert index.draft(tokens, 3) == [3, 7, 1]          # "1 2" last ended before 3 7
    tokens += [3]
    assert index.draft(tokens, 2) == [7, 1]             # "1 2 3": the index grown in place
    assert NgramIndex().draft([4, 4, 4, 4], 5) == [4]   # "4 4 4" last ended before the last 4


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculation_gives_the_plain_tokens_in_fewer_forwards_on_repetitive_text(cycle_dir,
                                                                                  temperature):
    params = SamplingParams(n=2, temperature=temperature, max_new_tokens=30, ignore_eos=True,
                            seed=3)
    plain, plain_forwards = run(cycle_dir, CYCLE_PROMPTS, params)
    spec, spec_forwards = run(cycle_dir, CYCLE_PROMPTS, params, speculative_tokens=4)
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
    for a, b in zip(spec, plain):
        # The target's, through another kernel path (a packed forward over the draft).
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert plain_forwards == 30 and spec_forwards <= plain_forwards / 2
    # A forward draws one token a row beyond its accepted drafts: the rest were accepted drafts.
    tokens = sum(len(c.token_ids) for c in spec)
    assert run.speculation["accepted"] >= tokens - len(spec) * spec_forwards
    assert run.speculation["drafted"] >= run.speculation["accepted"] > 0


def test_a_finishing_token_inside_an_accepted_draft_ends_the_answer(cycle_dir):
    params = SamplingParams(temperature=0.0, max_new_tokens=30, stop_token_ids=(10,))
    plain, _ = run(cycle_dir, [[12, 13, 14, 15, 16, 10, 11, 12]], params)
    spec, _ = run(cycle_dir, [[12, 13, 14, 15, 16, 10, 11, 12]], params, speculative_tokens=4)
    assert spec[0].token_ids == plain[0].token_ids == [13, 14, 15, 16, 10]
    assert len(spec[0].logprobs) == 5 and spec[0].finish_reason == "stop"


def test_speculative_draws_follow_the_target_distribution(tmp_path):
    """250 draws of 3 tokens after a repetitive prompt (a 1-token draft of the second, verified with
    the third): the third token's frequencies, among the draws whose first two are the cycle's (the
    draft accepted), match the model's exact conditional distribution (chi-square, p > 0.001), and
    equal plain decoding's draws one for one. The others rejected their draft: run() checks that
    its blocks came back."""
    model = make_cycle_model(sharpness=7.0)
    model_dir = save(model, tmp_path)
    prompt = [12, 13, 14, 15, 16, 10, 11]
    params = SamplingParams(n=250, temperature=1.0, max_new_tokens=3, ignore_eos=True, seed=11)
    spec, forwards = run(model_dir, [prompt], params, speculative_tokens=2, speculate_below=1000)
    plain, _ = run(model_dir, [prompt], params)
    # The prefill, the verify step, a plain step for the rows that rejected their draft.
    assert [c.token_ids for c in spec] == [c.token_ids for c in plain] and forwards == 3
    pair = [12, 13]
    thirds = [c.token_ids[2] for c in spec if c.token_ids[:2] == pair]
    with torch.no_grad():
        probs = model(torch.tensor([prompt + pair])).logits[0, -1].float().softmax(-1)
    # The cycle's next token, and the rest (each too rare to count apart).
    top = probs.topk(1).indices.tolist()
    expected = [probs[t].item() for t in top] + [1 - probs[top].sum().item()]
    observed = [sum(t == u for t in thirds) for u in top] + [sum(t not in top for t in thirds)]
    assert len(thirds) > 50 and 0.2 < expected[-1] < 0.8
    assert chi_square_pvalue(observed, [p * len(thirds) for p in expected]) > 1e-3


def chi_square_pvalue(observed, expected) -> float:
    """P(X >= the statistic) for X chi-square with len - 1 degrees of freedom."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = torch.tensor((len(observed) - 1) / 2)
    return torch.special.gammaincc(dof, torch.tensor(stat / 2)).item()


def test_speculation_refuses_the_exact_mode(cycle_dir):
    with pytest.raises(ConfigValueError, match="^batch_invariant=True with speculative_tokens=2: not supported"):
        LLM(cycle_dir, kv_cache_memory=1 << 22, block_size=4, speculative_tokens=2,
            batch_invariant=True)


def test_generate_command_speculates_with_the_plain_greedy_tokens(cycle_dir, capsys):
    def generate(*extra):
        args = cli.build_parser().parse_args(
            ["generate", "--model", str(cycle_dir), "--prompt", "hello world", "--temperature", "0",
             "--max-new-tokens", "24", "--json", "--kv-cache-memory", "1000000", "--no-progress",
             *extra])
        assert args.run(args) == 0
        return capsys.readouterr()
    plain, spec = generate(), generate("--speculative-tokens", "4")
    assert spec.out == plain.out
    forwards, tokens = [int(w) for w in spec.err.split() if w.isdigit()][:2]
    assert tokens == 24 and forwards <= tokens / 2


def test_the_hybrid_actor_speculates_with_the_plain_rollout(cycle_dir):
    """rollout.speculative_tokens reaches the trainer's engine: the same rows and log-probs."""
    from fusedrl.engine.inference.hybrid_actor import HybridActor
    from fusedrl.engine.model.hf_io import load_model
    policy = load_model(cycle_dir)
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, ignore_eos=True, seed=5)
    rollouts = [sample_responses(HybridActor(policy, kv_cache_memory=1 << 22, block_size=4,
                                             speculative_tokens=k, speculate_below=16),
                                 CYCLE_PROMPTS, params) for k in (0, 4)]
    (plain, plain_logprobs), (spec, spec_logprobs) = rollouts
    assert spec == plain
    torch.testing.assert_close(spec_logprobs, plain_logprobs, atol=1e-4, rtol=0)


def test_chunked_prefill_equals_one_piece_and_takes_turns_with_decoding(model_dirs):
    """A 21-token prompt prefilled 4 tokens a step, beside a short one already decoding: the same
    tokens and log-probs as one-piece prefill, with decode steps between its chunks."""
    from engine_testing import random_prompts
    model_dir = model_dirs["qwen2"][0]
    prompts = random_prompts([3, 21, 6], seed=2)
    params = SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=4)
    plain, _ = run(model_dir, prompts, params)
    llm = LLM(model_dir, kv_cache_memory=1 << 22, block_size=4, prefill_chunk=4)
    steps = []
    launch = llm.runner.launch
    llm.runner.launch = lambda seqs, is_prefill, **kwargs: steps.append(
        "P" if is_prefill else "D") or launch(seqs, is_prefill, **kwargs)
    chunk_step = llm.runner.prefill_chunk
    llm.runner.prefill_chunk = lambda seq: steps.append("C") or chunk_step(seq)
    chunked = [c for o in llm.generate(prompts, params) for c in o.outputs]
    assert [c.token_ids for c in chunked] == [c.token_ids for c in plain]
    for a, b in zip(chunked, plain):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    order = "".join(steps)
    # The first sample's 21 tokens: 5 chunks and a last prefill step that samples (the second
    # sample finds the first's full blocks and prefills its last token).
    assert order.count("C") >= 5 and "CD" in order and "DC" in order, order
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks

"""The batch-invariant mode end to end: the sampler's log-prob of every sampled token equals, bit for
bit, a separate training forward of the same tokens, whatever the batch the token was generated in
(alone, in a batch of 7, after a preemption, among n=4 samples sharing prompt blocks) and whatever the
pack it is scored in, on tiny Llama, Qwen2 and Qwen3 models."""
import pytest
import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.runner import kv_bytes_per_block
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.stages.ppo.rollout import pack_rollout
from engine_testing import random_prompts
from invariant_testing import one_thread  # noqa: F401 (autouse fixture)

BLOCK = 4
LENGTHS = [5, 13, 2, 9, 6, 11, 3]  # prompt of interest: index 1 (13 tokens, spans 4 pages)
SAMPLING = {
    "t1": SamplingParams(temperature=1.0, max_new_tokens=10, seed=7),
    "t07_top_p": SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=10, seed=7),
    "t13_top_k": SamplingParams(temperature=1.3, top_k=20, max_new_tokens=10, seed=7),
    "greedy": SamplingParams(temperature=0, max_new_tokens=10),
}


def exact_llm(path, dtype="float32", blocks=None):
    """An engine in the exact mode; `blocks` limits the pool (preemption)."""
    memory = None
    if blocks is not None:
        config = LLM(path, dtype=dtype, kv_cache_memory=1 << 20).config
        memory = blocks * kv_bytes_per_block(config, getattr(torch, dtype), BLOCK)
    return LLM(path, dtype=dtype, block_size=BLOCK, kv_cache_memory=memory, batch_invariant=True)


def training_logprobs(llm, prompts, responses, temperature):
    """The trainer's old log-probs of the responses: one packed forward in the engine's mode -> [R] lists."""
    mode = llm.batch_invariant
    packed = pack_rollout(prompts, responses, "cpu")
    with torch.no_grad():
        hidden = mode.packed_hidden(llm.model, packed.input_ids, packed.seqlens)
        logp = mode.head_logprobs(hidden.index_select(0, packed.target_rows), llm.model.lm_head.weight,
                                  packed.target_ids, temperature=temperature or 1.0)
    return [row.tolist() for row in logp.split(packed.target_counts)]


def compositions(path, dtype):
    """name -> (prompts, completions) of the same prompt generated in different batches."""
    prompts = random_prompts(LENGTHS, seed=11)
    target = prompts[1]
    return prompts, target, {
        "alone": lambda p: [exact_llm(path, dtype).generate(target, p)[0]],
        "batch_of_7": lambda p: exact_llm(path, dtype).generate(prompts, p),
        "preempted": lambda p: _preempted(path, dtype, prompts, p),
        "n4": lambda p: exact_llm(path, dtype).generate([target, prompts[3]], _with(p, n=4)),
    }


def _with(params, **fields):
    return SamplingParams(**{**params.__dict__, **fields})


def _preempted(path, dtype, prompts, params):
    llm = exact_llm(path, dtype, blocks=14)
    outputs = llm.generate(prompts, params)
    assert llm.scheduler.num_preemptions > 0
    return outputs


def rows_of(outputs):
    """(prompt, response, sampler log-probs) of every completion."""
    return [(o.prompt_token_ids, c.token_ids, c.logprobs) for o in outputs for c in o.outputs]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_sampler_logprobs_equal_a_training_forward_bit_for_bit(model_dirs, arch, sampling):
    path, _ = model_dirs[arch]
    params = SAMPLING[sampling]
    prompts, target, runs = compositions(path, "float32")
    scorer = exact_llm(path)  # the trainer: its own engine object, the same weights
    of_target = {}
    for name, run in runs.items():
        rows = rows_of(run(params))
        ps, rs, sampler = zip(*rows)
        # Scored in one pack (every row), and reversed (another pack layout): identical either way.
        trained = training_logprobs(scorer, list(ps), list(rs), params.temperature)
        reversed_pack = training_logprobs(scorer, list(ps[::-1]), list(rs[::-1]), params.temperature)[::-1]
        for r, (s, t, u) in enumerate(zip(sampler, trained, reversed_pack)):
            assert s == t == u, f"{name}, row {r}: sampler {s} vs training {t} / {u}"
        of_target[name] = [(r, lp) for p, r, lp in rows if p == target]
    # The target prompt's (seeded) completion is the same in every batch, tokens and log-probs.
    first = of_target["alone"][0]
    assert all(rows[0] == first for rows in of_target.values()), of_target


def test_bf16_weights_are_bit_exact_too(model_dirs):
    path, _ = model_dirs["qwen3"]
    params = SAMPLING["t07_top_p"]
    prompts = random_prompts(LENGTHS, seed=12)
    llm = exact_llm(path, "bfloat16")
    ps, rs, sampler = zip(*rows_of(llm.generate(prompts, _with(params, n=2))))
    assert list(sampler) == training_logprobs(exact_llm(path, "bfloat16"), list(ps), list(rs), params.temperature)


def test_exact_mode_agrees_with_the_default_engine_within_rounding(model_dirs):
    """Same model, same distribution: only the rounding differs from the default kernels."""
    path, _ = model_dirs["qwen2"]
    prompts = random_prompts(LENGTHS, seed=13)
    exact = exact_llm(path).generate(prompts, SAMPLING["greedy"])
    default = LLM(path, dtype="float32", block_size=BLOCK).generate(prompts, SAMPLING["greedy"])
    for e, d in zip(exact, default):
        n = next((i for i, (a, b) in enumerate(zip(e.outputs[0].token_ids, d.outputs[0].token_ids)) if a != b),
                 len(e.outputs[0].token_ids))  # compare up to a near-tie flipped by rounding, if any
        torch.testing.assert_close(torch.tensor(e.outputs[0].logprobs[:n]), torch.tensor(d.outputs[0].logprobs[:n]),
                                   atol=1e-4, rtol=0)


def test_bad_mode_arguments_are_rejected(model_dirs):
    path, _ = model_dirs["qwen2"]
    with pytest.raises(ValueError, match="batch_invariant='yes' must be True or False"):
        LLM(path, batch_invariant="yes")

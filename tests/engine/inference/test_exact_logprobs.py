"""The batch-invariant mode end to end: the sampler's log-prob of every sampled token equals, bit for
bit, a separate training forward of the same tokens, whatever the batch the token was generated in
(alone, in a batch of 7, after a preemption, among n=4 samples sharing prompt blocks, in a later turn
of a multi-turn trajectory) and whatever the pack it is scored in, on tiny Llama, Qwen2 and Qwen3 models: on the CPU's fixed-order torch ops, and
on the Triton kernels a GPU runs (here under the interpreter, on fewer cases: it is slow)."""
import pytest
import torch

from fusedrl import kernels
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.runner import kv_bytes_per_block
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.multi_turn import TurnReply
from fusedrl.engine.model.invariant import BatchInvariant
from fusedrl.engine.stages.rollout.packs import pack_rollout
from engine_testing import make_hf_model, make_tokenizer, random_prompts
from invariant_testing import one_thread  # noqa: F401 (autouse fixture)

BLOCK = 4
LENGTHS = [5, 13, 2, 9, 6, 11, 3]  # prompt of interest: index 1 (13 tokens, spans 4 pages)
SAMPLING = {
    "t1": SamplingParams(temperature=1.0, max_new_tokens=10, seed=7),
    "t07_top_p": SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=10, seed=7),
    "t13_top_k": SamplingParams(temperature=1.3, top_k=20, max_new_tokens=10, seed=7),
    "greedy": SamplingParams(temperature=0, max_new_tokens=10),
}


def exact_llm(path, dtype="float32", blocks=None, segment=256):
    """An engine in the exact mode; `blocks` limits the pool (preemption); `segment` is the Triton
    attention's (the CPU path does not use it)."""
    memory = None
    if blocks is not None:
        config = LLM(path, dtype=dtype, kv_cache_memory=1 << 20).config
        memory = blocks * kv_bytes_per_block(config, getattr(torch, dtype), BLOCK)
    return LLM(path, dtype=dtype, block_size=BLOCK, kv_cache_memory=memory,
               batch_invariant=BatchInvariant(BLOCK, segment))


def training_logprobs(llm, prompts, responses, temperature):
    """The trainer's old log-probs of the responses: one packed forward in the engine's mode -> [R] lists."""
    mode = llm.batch_invariant
    packed = pack_rollout(prompts, responses, llm.device)
    with torch.no_grad():
        hidden = mode.packed_hidden(llm.model, packed.input_ids, packed.seqlens)
        logp = mode.head_logprobs(hidden.index_select(0, packed.target_rows), llm.model.lm_head.weight,
                                  packed.target_ids, temperature=temperature or 1.0)
    return [row.tolist() for row in logp.split(packed.target_counts)]


def compositions(path, dtype, segment=256):
    """name -> (prompts, completions) of the same prompt generated in different batches."""
    prompts = random_prompts(LENGTHS, seed=11)
    target = prompts[1]
    return prompts, target, {
        "alone": lambda p: [exact_llm(path, dtype, segment=segment).generate(target, p)[0]],
        "batch_of_7": lambda p: exact_llm(path, dtype, segment=segment).generate(prompts, p),
        "preempted": lambda p: _preempted(path, dtype, prompts, p, segment),
        "n4": lambda p: exact_llm(path, dtype, segment=segment).generate([target, prompts[3]], _with(p, n=4)),
    }


def _with(params, **fields):
    return SamplingParams(**{**params.__dict__, **fields})


def _preempted(path, dtype, prompts, params, segment):
    llm = exact_llm(path, dtype, blocks=14, segment=segment)
    outputs = llm.generate(prompts, params)
    assert llm.scheduler.num_preemptions > 0
    return outputs


def rows_of(outputs):
    """(prompt, response, sampler log-probs) of every completion."""
    return [(o.prompt_token_ids, c.token_ids, c.logprobs) for o in outputs for c in o.outputs]


def check_compositions(path, dtype, params, names, segment=256, reverse=True):
    """Every sampled token's log-prob == the training forward's, scored in one pack (and in the
    reversed pack); the target prompt's seeded completion is the same in every batch, tokens and
    log-probs."""
    prompts, target, runs = compositions(path, dtype, segment)
    scorer = exact_llm(path, dtype, segment=segment)  # the trainer: its own engine object, the same weights
    of_target = {}
    for name in names:
        rows = rows_of(runs[name](params))
        ps, rs, sampler = zip(*rows)
        trained = training_logprobs(scorer, list(ps), list(rs), params.temperature)
        reversed_pack = training_logprobs(scorer, list(ps[::-1]), list(rs[::-1]), params.temperature)[::-1] \
            if reverse else trained
        for r, (s, t, u) in enumerate(zip(sampler, trained, reversed_pack)):
            assert s == t == u, f"{name}, row {r}: sampler {s} vs training {t} / {u}"
        of_target[name] = [(r, lp) for p, r, lp in rows if p == target]
    first = of_target[names[0]][0]
    assert all(rows[0] == first for rows in of_target.values()), of_target


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("sampling", list(SAMPLING))
def test_sampler_logprobs_equal_a_training_forward_bit_for_bit(model_dirs, arch, sampling):
    check_compositions(model_dirs[arch][0], "float32", SAMPLING[sampling], ["alone", "batch_of_7", "preempted", "n4"])


def observation(row, turn_tokens):
    """An environment's reply of 3 to 8 tokens, set by the turn's tokens alone (not by the row's
    place in the batch): a later turn's prefill starts anywhere in a page."""
    return TurnReply(tuple(range(5, 8 + (sum(turn_tokens) + len(turn_tokens)) % 6)))


@pytest.fixture(scope="module")
def one_layer_dirs(tmp_path_factory):
    """arch -> a saved one-layer model: the interpreter runs every program of every kernel in Python,
    and a second layer would repeat the first's kernels with other weights."""
    dirs = {}
    for arch in ("llama", "qwen2", "qwen3"):
        dirs[arch] = tmp_path_factory.mktemp(f"{arch}-1layer")
        make_hf_model(arch, num_hidden_layers=1).save_pretrained(dirs[arch])
        make_tokenizer().save_pretrained(dirs[arch])
    return dirs


# (arch, dtype, sampling, compositions, attention segment, also score the reversed pack): each model
# family, both dtypes, the four compositions, greedy / temperature / top-p, two pack layouts, and
# segments merged (16 keys: sequences reach 19). Short completions, for the interpreter's sake.
TRITON_CASES = {
    "llama-fp32-top_p": ("llama", "float32", _with(SAMPLING["t07_top_p"], max_new_tokens=4), ["alone", "batch_of_7"],
                         256, True),
    "qwen2-fp32-greedy": ("qwen2", "float32", _with(SAMPLING["greedy"], max_new_tokens=6), ["alone", "preempted"],
                          256, False),
    "qwen3-bf16-t1": ("qwen3", "bfloat16", _with(SAMPLING["t1"], max_new_tokens=6), ["alone", "n4"], 16, False),
}


def check_turns(path, prompts, params, alone=True):
    """Three-turn trajectories (multi_turn.py: each later turn prefills the environment's tokens on top
    of the earlier turns' cached pages): every model token's sampler log-prob equals the training
    forward's over the whole trajectory, and (`alone`) the second prompt's trajectories are the same
    alone as among all the prompts' (tokens and log-probs), so ranks that split a rollout draw what
    one process draws."""
    batch = exact_llm(path).generate_turns(prompts, params, observation, max_turns=3)
    assert all(t.turns == 3 for t in batch)
    trained = training_logprobs(exact_llm(path), [t.prompt_token_ids for t in batch],
                                [t.token_ids for t in batch], params.temperature)
    for r, (t, logp) in enumerate(zip(batch, trained)):
        model = [lp for lp, is_model in zip(logp, t.model_mask) if is_model]
        assert model == [lp for lp, is_model in zip(t.logprobs, t.model_mask) if is_model], r
    if alone:
        by_itself = exact_llm(path).generate_turns(prompts[1:2], params, observation, max_turns=3)
        second = batch[params.n:2 * params.n]
        assert [(t.token_ids, t.logprobs) for t in by_itself] == [(t.token_ids, t.logprobs)
                                                                  for t in second]


def test_later_turns_are_bit_exact_and_independent_of_the_batch(model_dirs):
    check_turns(model_dirs["qwen2"][0], random_prompts(LENGTHS, seed=14),
                _with(SAMPLING["t1"], n=2, max_new_tokens=6))


def test_later_turns_on_the_triton_path_too(one_layer_dirs):
    """The multi-turn case on the kernels a GPU runs, interpreted: one prompt and short turns (the
    other Triton cases show a row's independence of its batch)."""
    with kernels.use_backend("triton"):
        check_turns(one_layer_dirs["qwen2"], random_prompts([13], seed=14),
                    _with(SAMPLING["t1"], max_new_tokens=2), alone=False)


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_the_triton_path_is_bit_exact_too(one_layer_dirs, case):
    """The kernels a GPU runs (fixed-tile matmul, segment attention, fused norm/RoPE/SiLU, per-row
    log-softmax), interpreted on the CPU."""
    arch, dtype, params, names, segment, reverse = TRITON_CASES[case]
    with kernels.use_backend("triton"):
        check_compositions(one_layer_dirs[arch], dtype, params, names, segment, reverse)


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
    with pytest.raises(ValueError, match="batch_invariant='yes' must be True, False or a BatchInvariant"):
        LLM(path, batch_invariant="yes")
    with pytest.raises(ValueError, match="batch_invariant.chunk_size=8 must be the block_size 4"):
        LLM(path, block_size=4, batch_invariant=BatchInvariant(8))


def test_the_decode_graph_path_keeps_the_bits(one_layer_dirs):
    """On a GPU the exact mode's decode steps are CUDA graphs: static buffers, batches padded with
    rows of slot -1 and position 0 over a full-width block table. That bookkeeping, replayed eagerly
    here on the Triton path, gives the same tokens and log-probs as the eager steps."""
    from fusedrl.engine.inference.decode_graphs import DecodeGraphs

    path = one_layer_dirs["qwen2"]
    prompts = random_prompts([5, 13, 2], seed=3)
    params = [SamplingParams(temperature=1.0, max_new_tokens=n, seed=7) for n in (5, 3, 2)]  # batches 3, 2, 1
    with kernels.use_backend("triton"):
        eager = rows_of(exact_llm(path).generate(prompts, params))
        llm = exact_llm(path)
        llm.runner.graphs = DecodeGraphs(llm.runner, max_num_seqs=4, capture=False)
        fills = []  # (sequences, rows, full-width tables) of each decode step
        fill = llm.runner.decode_inputs.fill
        llm.runner.decode_inputs.fill = lambda seqs, size, full_tables, previous=None: (
            fills.append((len(seqs), size, full_tables)) or fill(seqs, size, full_tables,
                                                                  previous))
        assert rows_of(llm.generate(prompts, params)) == eager
    assert (3, 4, True) in fills  # a batch that ran padded (in the 4-row graph)

"""End-to-end generation: parity with transformers, paging/sharing/preemption invariance, errors."""
import os

import pytest
import torch

from fusedrl.engine.errors import NonFiniteError
from fusedrl.engine.inference.llm import LLM
from fusedrl.kernels.reference.sampling import kept_mask

from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.inference.runner import kv_bytes_per_block
from fusedrl.kernels import use_backend
from engine_testing import ARCHS, EOS, MAX_POS, VOCAB, random_prompts

LENGTHS = [3, 17, 33, 8, 1]
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)


def hf_greedy(hf, prompt, max_new_tokens):
    """transformers' own greedy generate, one prompt at a time (no padding involved)."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=0)
    return out[0, len(prompt):].tolist()


def all_blocks_free(llm):
    bm = llm.block_manager
    return bm.num_free_blocks == bm.num_blocks and not any(bm.ref_counts) and not bm.key_to_block


def tokens_of(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_batch_matches_transformers_generate(model_dirs, arch):
    path, hf = model_dirs[arch]
    llm = LLM(path, dtype="float32", block_size=4)
    prompts = random_prompts(LENGTHS, seed=2)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outputs):
        expected = hf_greedy(hf, prompt, GREEDY.max_new_tokens)
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == ("stop" if expected[-1] == EOS else "length")
    assert all_blocks_free(llm)


@pytest.fixture(scope="module")
def reference(qwen2_dir):
    """Greedy tokens with roomy, unshared, unpreempted pages: what every variant must reproduce."""
    llm = LLM(qwen2_dir, block_size=MAX_POS)  # one block per sequence: effectively unpaged
    prompts = random_prompts(LENGTHS, seed=3)
    return prompts, tokens_of(llm.generate(prompts, GREEDY))


def test_reference_is_greedy_recompute_without_cache(qwen2_dir, reference):
    """The cache-free way: rerun the packed forward over the whole sequence for every token."""
    prompts, expected = reference
    llm = LLM(qwen2_dir)
    model = llm.model
    for prompt, exp in zip(prompts, expected):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(len(exp[0])):
                hidden = model.forward_packed(torch.tensor(ids, device=llm.device), [len(ids)])
                ids.append(model.compute_logits(hidden[-1:]).argmax(-1).item())
        assert ids[len(prompt):] == exp[0]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_block_size_does_not_change_tokens(qwen2_dir, reference, block_size):
    prompts, expected = reference
    llm = LLM(qwen2_dir, block_size=block_size)
    assert tokens_of(llm.generate(prompts, GREEDY)) == expected
    assert all_blocks_free(llm)


def test_unwritten_cache_slots_never_leak_into_outputs(qwen2_dir, reference):
    prompts, expected = reference
    llm = LLM(qwen2_dir, block_size=4)
    llm.runner.kv_pool.fill_(float("nan"))  # what torch.empty may hand back
    assert tokens_of(llm.generate(prompts, GREEDY)) == expected


def test_shared_prefix_gives_the_same_tokens_and_holds_prompt_blocks_once(qwen2_dir, reference):
    prompts, expected = reference
    llm = LLM(qwen2_dir, block_size=4)
    seen_refcounts = []
    launch = llm.runner.launch

    def spy(seqs, is_prefill, **kwargs):  # the prompt blocks' reference counts during the run
        seen_refcounts.append(max(llm.block_manager.ref_counts))
        return launch(seqs, is_prefill, **kwargs)

    llm.runner.launch = spy
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_new_tokens=24, n=3))
    assert max(seen_refcounts) == 3  # the n samples of a prompt hold its full blocks once
    for out, exp in zip(outputs, expected):
        assert [c.token_ids for c in out.outputs] == exp * 3
    assert all_blocks_free(llm)


def test_tiny_pool_preempts_and_gives_the_same_tokens(qwen2_dir, reference):
    prompts, expected = reference
    # 15 blocks of 4 tokens: the longest sequence (33 + 24 tokens) needs 15, all five need ~40.
    llm = LLM(qwen2_dir, block_size=4, kv_cache_memory=15 * kv_bytes_per_block(
        LLM(qwen2_dir, kv_cache_memory=1 << 20).config, torch.float32, 4))
    assert llm.block_manager.num_blocks == 15
    assert tokens_of(llm.generate(prompts, GREEDY)) == expected
    assert llm.scheduler.num_preemptions > 0
    assert all_blocks_free(llm)


def test_seeded_sampling_is_reproducible_across_batches_and_preemption(qwen2_dir):
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, max_new_tokens=16, seed=1234, n=2)
    prompts = random_prompts([6, 20], seed=4)
    alone = LLM(qwen2_dir, block_size=4).generate(prompts[1], params)[0]
    tiny = LLM(qwen2_dir, block_size=4, kv_cache_memory=2048 * 11)  # 11 blocks: preemption
    batched = tiny.generate(prompts, [SamplingParams(temperature=1.0, max_new_tokens=16, n=3), params])[1]
    assert tiny.scheduler.num_preemptions > 0
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in batched.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # the n samples differ
    for a, b in zip(alone.outputs, batched.outputs):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert all_blocks_free(tiny)


def test_seeded_prompts_draw_streams_of_their_own(qwen2_dir):
    """One seed for a batch: each prompt's sample j reads its own random numbers, not sample j's of
    every prompt. The tiny model's next-token distribution is nearly flat, so prompts that shared
    a stream would mostly pick the same first token."""
    prompts = random_prompts([7] * 48, seed=6)
    params = SamplingParams(temperature=1.0, max_new_tokens=1, n=2, seed=11)
    firsts = [[c.token_ids[0] for c in out.outputs] for out in LLM(qwen2_dir).generate(prompts, params)]
    for j in range(2):
        picks = [f[j] for f in firsts]
        assert max(picks.count(t) for t in set(picks)) <= 12, picks


def test_device_logprobs_are_the_completions_logprobs_through_preemption(qwen2_dir):
    """The engine's device buffer holds each sampled token's log-prob where Completion.logprob_slots
    says, the same fp32 numbers as Completion.logprobs, also for sequences preempted and recomputed."""
    tiny = LLM(qwen2_dir, block_size=4, kv_cache_memory=2048 * 11)  # 11 blocks: preemption
    outs = tiny.generate(random_prompts([6, 20], seed=4), SamplingParams(temperature=1.0, max_new_tokens=16, n=3,
                                                                        seed=3))
    assert tiny.scheduler.num_preemptions > 0
    completions = [c for out in outs for c in out.outputs]
    slots = [s for c in completions for s in c.logprob_slots]
    assert len(set(slots)) == len(slots) == sum(len(c.token_ids) for c in completions)
    for c in completions:
        assert torch.equal(tiny.device_logprobs(c.logprob_slots).cpu(), torch.tensor(c.logprobs, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"slots must be in \[0, \d+\)"):
        tiny.device_logprobs([max(slots) + 1])


def test_sampled_logprobs_are_under_the_sampling_distribution(qwen2_dir):
    llm = LLM(qwen2_dir)
    prompt = random_prompts([9], seed=5)[0]
    params = SamplingParams(temperature=0.7, top_k=20, max_new_tokens=6, seed=0)
    completion = llm.generate(prompt, params)[0].outputs[0]
    ids = prompt + completion.token_ids
    with torch.no_grad():
        logits = llm.model.compute_logits(llm.model.forward_packed(torch.tensor(ids, device=llm.device), [len(ids)]))
    for i, (token, logprob) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = logits[len(prompt) - 1 + i][None].cpu()
        inv_temp = torch.tensor([1 / 0.7])
        scaled = row * inv_temp
        # top-k 20 on the 16-bit order key (fp32 logits: their bf16 truncation; ties kept): sampler.py
        kept = kept_mask(row, scaled, inv_temp, torch.tensor([20]), torch.tensor([1.0]), torch.tensor([0.0]))
        expected = torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), -1)[0, token]
        assert abs(logprob - expected.item()) < 1e-4


def test_string_prompts_are_tokenized_and_completions_decoded(qwen2_dir):
    llm = LLM(qwen2_dir)
    texts = ["hello world", "the lazy fox!"]
    out = llm.generate(texts, SamplingParams(temperature=0, max_new_tokens=6))
    for text, o in zip(texts, out):
        assert o.prompt_token_ids == llm.tokenizer.encode(text) and llm.tokenizer.decode(o.prompt_token_ids) == text
        completion = o.outputs[0]
        assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        by_ids = llm.generate(o.prompt_token_ids, SamplingParams(temperature=0, max_new_tokens=6))
        assert by_ids[0].outputs[0].token_ids == completion.token_ids
        undecoded = llm.generate(texts, SamplingParams(temperature=0, max_new_tokens=6), decode_text=False)
        assert all(o.outputs[0].text is None for o in undecoded)  # rollouts skip the decode


def test_stop_tokens_end_a_completion(qwen2_dir, reference):
    prompts, expected = reference
    first = expected[1][0][5]  # stop on the sixth greedy token of prompt 1
    out = LLM(qwen2_dir).generate(prompts[1], SamplingParams(temperature=0, max_new_tokens=24,
                                                             stop_token_ids=(first,)))[0].outputs[0]
    cut = expected[1][0].index(first) + 1
    assert out.token_ids == expected[1][0][:cut] and out.finish_reason == "stop"


# ---- bad inputs: each names the argument at fault ----

@pytest.fixture(scope="module")
def llm(qwen2_dir):
    return LLM(qwen2_dir, block_size=4)


def test_non_finite_logits_are_an_error_not_token_0(qwen2_dir):
    llm = LLM(qwen2_dir, block_size=4, kv_cache_memory=1 << 20)
    with torch.no_grad():
        llm.model.model.norm.weight[3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"the model's logits are not finite \(sampled log-prob nan"):
        llm.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4))


def test_empty_prompt_is_rejected(llm):
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        llm.generate([[5, 6], []])
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        llm.generate([[]])
    assert llm.generate([]) == []  # no prompts at all is not an error
    assert all_blocks_free(llm)


def test_engine_sizes_are_validated(qwen2_dir):
    with pytest.raises(ValueError, match="max_num_seqs=0"):
        LLM(qwen2_dir, max_num_seqs=0)
    with pytest.raises(ValueError, match="block_size=0"):
        LLM(qwen2_dir, block_size=0)


def test_prompt_past_context_length_is_rejected(llm):
    with pytest.raises(ValueError, match=rf"prompts\[0\] has {MAX_POS} tokens.*max_model_len={MAX_POS}"):
        llm.generate([[11] * MAX_POS])


def test_out_of_vocabulary_token_is_rejected(llm):
    with pytest.raises(ValueError, match=rf"prompts\[0\] has token id {VOCAB} outside"):
        llm.generate([[1, VOCAB]])


def test_pool_too_small_for_one_sequence_is_rejected(qwen2_dir):
    small = LLM(qwen2_dir, block_size=4, kv_cache_memory=2048 * 3)  # 3 blocks = 12 tokens
    with pytest.raises(ValueError, match=r"KV pool \(3 blocks of 4 tokens\) cannot hold one sequence"):
        small.generate([[11] * 8], SamplingParams(max_new_tokens=8))
    assert all_blocks_free(small)  # nothing was admitted


def test_kv_budget_below_one_block_is_rejected(qwen2_dir):
    with pytest.raises(ValueError, match="kv_cache_memory=100 does not hold one block"):
        LLM(qwen2_dir, kv_cache_memory=100)


def test_kv_fraction_needs_a_gpu(qwen2_dir):
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with pytest.raises(ValueError, match="kv_cache_memory as a fraction"):
        LLM(qwen2_dir, kv_cache_memory=0.5)


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(n=0), "n"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(seed=1.5), "seed"), (dict(stop_token_ids=(-3,)), "stop_token_ids"),
])
def test_invalid_sampling_values_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=rf"SamplingParams\.{name}="):
        SamplingParams(**kwargs)


def test_unknown_sampling_option_is_rejected():
    with pytest.raises(TypeError, match="topp"):
        SamplingParams(topp=0.5)


def test_mismatched_sampling_params_list_is_rejected(llm):
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        llm.generate([[5], [6]], [SamplingParams()])


def test_unknown_dtype_is_rejected(qwen2_dir):
    with pytest.raises(ValueError, match="dtype 'float8'"):
        LLM(qwen2_dir, dtype="float8")


def test_decode_graph_bookkeeping_pads_batches_without_changing_tokens(qwen2_dir, reference):
    """The CUDA-graph path's static buffers and padding rows (slot -1, context 0), replayed eagerly:
    batches of 1..5 sequences run in buffers of 1, 2, 4 and 5 rows."""
    from fusedrl.engine.inference.decode_graphs import DecodeGraphs

    prompts, expected = reference
    llm = LLM(qwen2_dir, block_size=4, max_num_seqs=5)
    llm.runner.graphs = DecodeGraphs(llm.runner, max_num_seqs=5, capture=False)
    assert sorted(llm.runner.graphs.graphs) == [1, 2, 4, 5]
    fills = []  # (sequences, rows, full-width tables) of each decode step
    fill = llm.runner.decode_inputs.fill
    llm.runner.decode_inputs.fill = lambda seqs, size, full_tables, previous=None: (
        fills.append((len(seqs), size, full_tables)) or fill(seqs, size, full_tables, previous))
    lengths = [24, 21, 18, 9, 5]  # sequences leave one by one: decode batches of 5, 4, 3, 2, 1
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in lengths]
    outputs = tokens_of(llm.generate(prompts, params))
    assert outputs == [[exp[0][:n]] for exp, n in zip(expected, lengths)]
    assert (3, 4, True) in fills  # a batch that ran padded (in the 4-row graph)
    assert all_blocks_free(llm)


def test_decode_inputs_written_by_what_moved_equal_full_writes_through_preemption(qwen2_dir,
                                                                                  reference):
    """Decode steps that write only what moved since the last (decode_inputs.py) send the bytes a
    full write sends, on the graph path's padded rows, through sequences leaving, preemption
    (a pool of 15 blocks) and readmission; the tokens are the reference's."""
    from fusedrl.engine.inference.decode_graphs import DecodeGraphs
    from fusedrl.engine.inference.decode_inputs import DecodeInputs
    from test_decode_inputs import assert_same_views

    prompts, expected = reference
    llm = LLM(qwen2_dir, block_size=4, max_num_seqs=5, kv_cache_memory=15 * kv_bytes_per_block(
        LLM(qwen2_dir, kv_cache_memory=1 << 20).config, torch.float32, 4))
    llm.runner.graphs = DecodeGraphs(llm.runner, max_num_seqs=5, capture=False)
    inputs = llm.runner.decode_inputs
    fill, write, counts = inputs.fill, inputs._write, {"fills": 0, "writes": 0}

    def counted_write(*args):
        counts["writes"] += 1
        return write(*args)

    def checked_fill(seqs, size, full_tables, previous=None):
        counts["fills"] += 1
        fill(seqs, size, full_tables, previous)
        fresh = DecodeInputs(inputs.rows, inputs.width, inputs.block_size, inputs._device.device)
        fresh.fill(seqs, size, full_tables, previous)
        assert_same_views(inputs, fresh, size, full_tables)
    inputs._write, inputs.fill = counted_write, checked_fill
    lengths = [24, 21, 18, 9, 5]
    params = [SamplingParams(temperature=0, max_new_tokens=n) for n in lengths]
    assert tokens_of(llm.generate(prompts, params)) == [[exp[0][:n]]
                                                        for exp, n in zip(expected, lengths)]
    assert llm.scheduler.num_preemptions > 0
    assert counts["writes"] < counts["fills"] / 2, counts  # most steps wrote only what moved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_generation_runs_and_mostly_agrees_with_fp32(qwen2_dir, reference, dtype):
    prompts, expected = reference
    llm = LLM(qwen2_dir, dtype=dtype, block_size=4)
    assert llm.runner.kv_pool.dtype == dtype
    outputs = llm.generate(prompts, GREEDY)
    # Rounding can flip a near-tie and the continuation diverges from there; the first tokens,
    # decided by well-separated logits in this model, agree.
    first = [o.outputs[0].token_ids[0] for o in outputs]
    assert sum(f == e[0][0] for f, e in zip(first, expected)) >= 4
    assert all(len(o.outputs[0].token_ids) == len(o.outputs[0].logprobs) for o in outputs)
    assert all_blocks_free(llm)


def test_generates_from_a_model_in_memory_and_sees_weight_updates(qwen2_dir, reference):
    """RLHF generates from the trainer's own parameters: no reload, no copy, no stale KV."""
    from fusedrl.engine.model.hf_io import load_model

    prompts, expected = reference
    model = load_model(qwen2_dir)
    llm = LLM(model, block_size=4)
    assert tokens_of(llm.generate(prompts, GREEDY)) == expected
    with torch.no_grad():  # an optimizer step, in place, as the trainer does it
        for p in model.parameters():
            p.mul_(1.5)
    after = tokens_of(llm.generate(prompts, GREEDY))
    fresh = LLM(model, block_size=4)  # nothing cached from the old weights can explain `after`
    assert after == tokens_of(fresh.generate(prompts, GREEDY)) and after != expected


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("block_size", [4, 6])
def test_generation_through_the_triton_kernels_gives_the_same_tokens(qwen2_dir, reference, block_size):
    """The runner's real slot mappings and block tables, fed to the Triton store and decode kernels."""
    prompts, expected = reference
    llm = LLM(qwen2_dir, block_size=block_size)
    llm.runner.kv_pool.fill_(float("nan"))
    params = SamplingParams(temperature=0, max_new_tokens=6)  # the interpreter is slow: few steps
    with use_backend("triton"):
        outputs = llm.generate(prompts[:3], params)
    assert tokens_of(outputs) == [[e[0][:6]] for e in expected[:3]]
    assert all_blocks_free(llm)


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels need a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("arch", ["llama2", "qwen3"])  # no biases; q/k norms (qwen2: the test above)
def test_the_fused_decode_step_is_the_eager_one(model_dirs, arch):
    """primitives.DECODE (each norm inside the GEMM after it, SiLU * up in gate/up's epilogue) and
    RoPE + store + attention in one launch, against the eager CPU step op for op: the same sampled
    tokens and log-probs to fp32 summation order, Qwen3's q/k norms and Llama's missing biases included."""
    prompts = random_prompts([5, 9], seed=4)
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=4, seed=3)
    runs = []
    for backend in ("triton", "torch"):
        with use_backend(backend):
            out = LLM(model_dirs[arch][0], block_size=4).generate(prompts, params)
        runs.append((tokens_of(out), [c.logprobs for o in out for c in o.outputs]))
    assert runs[0][0] == runs[1][0]
    torch.testing.assert_close(torch.tensor(runs[0][1]), torch.tensor(runs[1][1]), atol=1e-4, rtol=1e-4)


def test_graph_batch_sizes_are_small_powers_of_two_then_every_16():
    from fusedrl.engine.inference.runner import ModelRunner

    sizes = ModelRunner.GRAPH_BATCH_SIZES
    assert sizes[:5] == (1, 2, 4, 8, 16)
    assert all(b - a == 16 for a, b in zip(sizes[4:], sizes[5:]))
    assert sizes[-1] == 512
    # 129 rows run in the 144-row graph, not the 256-row one.
    assert min(s for s in sizes if s >= 129) == 144

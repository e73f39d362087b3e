"""Prompts with images in the paged engine, against transformers' generate: greedy tokens equal (the
vision tokens suppressed on its side, masked by the sampler on ours), the tower once per prompt's
samples, M-RoPE decode offsets, and chunked prefill, speculative decoding, prefix blocks and
carried answers composing with images."""
import pytest
import torch

from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.request import Request
from fusedrl.engine.data.vision_processor import ImageInputs
from fusedrl.engine.inference.image_prefill import image_digest
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.kernels import linear_token_logprobs
from vision_testing import FAMILIES, hf_inputs, image_prompt
from vision_testing import vlms  # noqa: F401 (the fixture)

NEW = 12
GREEDY = SamplingParams(temperature=0, max_new_tokens=NEW)


def _vision_ids(config):
    return [config.image_token_id, config.video_token_id, config.vision_start_token_id,
            config.vision_end_token_id]


def _prompt(config, seed=0):
    return image_prompt(config, [[7, 8, 9], [10, 11, 12, 13]], [(1, 4, 6), (1, 8, 4)], seed)


def _hf_greedy(hf, ids, pixels, grids, suppress=True):
    extra = {"suppress_tokens": _vision_ids(hf.config)} if suppress else {}
    out = hf.generate(**hf_inputs(hf.config, ids, pixels, grids), max_new_tokens=NEW,
                      do_sample=False, **extra)
    return out[0, len(ids):].tolist()


def _llm(path, **kwargs):
    return LLM(path, block_size=4, kv_cache_memory=1 << 22, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_equal_transformers_generate(vlms, family):
    path, hf = vlms[family]
    ids, pixels, grids = _prompt(hf.config)
    out = _llm(path).generate([ids.tolist()], SamplingParams(temperature=0, max_new_tokens=NEW,
                                                             n=2),
                              images=[ImageInputs(pixels, grids)])[0].outputs
    expected = _hf_greedy(hf, ids, pixels, grids)
    assert [c.token_ids for c in out] == [expected, expected]


def test_the_sampler_never_emits_vision_tokens(vlms):
    """This model's unmasked greedy answer holds a vision token (transformers emits it); the
    engine's, sampled at temperature 1 as well, never does."""
    path, hf = vlms["qwen2_5_vl"]
    ids, pixels, grids = _prompt(hf.config)
    assert set(_hf_greedy(hf, ids, pixels, grids, suppress=False)) & set(_vision_ids(hf.config))
    llm = _llm(path)
    for params in (GREEDY, SamplingParams(temperature=1.0, max_new_tokens=NEW, n=4, seed=1)):
        out = llm.generate([ids.tolist()], params, images=[ImageInputs(pixels, grids)])[0]
        assert not {t for c in out.outputs for t in c.token_ids} & set(_vision_ids(hf.config))


def test_the_tower_runs_once_per_set_of_images(vlms, monkeypatch):
    """Four samples of one prompt: one tower run. Two prompts of the same tokens over other pixels:
    one run each, no KV block shared between them, each answer transformers'."""
    path, hf = vlms["qwen3_vl"]
    llm = _llm(path)
    calls = []
    encode = llm.model.encode_images
    monkeypatch.setattr(llm.model, "encode_images", lambda *a: calls.append(1) or encode(*a))
    ids, pixels, grids = _prompt(hf.config)
    llm.generate([ids.tolist()], SamplingParams(max_new_tokens=2, n=4, seed=0),
                 images=[ImageInputs(pixels, grids)])
    assert len(calls) == 1
    other = _prompt(hf.config, seed=5)[1]
    calls.clear()
    outs = llm.generate([ids.tolist()] * 2, GREEDY,
                        images=[ImageInputs(pixels, grids), ImageInputs(other, grids)])
    assert len(calls) == 2
    assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(hf, ids, pixels, grids),
                                                      _hf_greedy(hf, ids, other, grids)]


@pytest.mark.parametrize("options", [dict(prefill_chunk=5), dict(speculative_tokens=2,
                                                                 speculate_below=100)])
def test_chunked_prefill_and_speculation_compose_with_images(vlms, options):
    """A chunk of 5 tokens cuts both images; speculative verify steps forward drafts past the
    prompt at their decode offsets: the greedy tokens stay transformers'."""
    path, hf = vlms["qwen2_5_vl"]
    ids, pixels, grids = _prompt(hf.config)
    out = _llm(path, **options).generate([ids.tolist()], GREEDY,
                                         images=[ImageInputs(pixels, grids)])[0]
    assert out.outputs[0].token_ids == _hf_greedy(hf, ids, pixels, grids)


def test_a_carried_answer_continues_with_its_images(vlms):
    """A partial rollout's answer carried into a new call goes on as one uninterrupted generate."""
    path, hf = vlms["qwen3_vl"]
    ids, pixels, grids = _prompt(hf.config)
    expected = _hf_greedy(hf, ids, pixels, grids)
    request = Request(ids.tolist(), GREEDY, answer=expected[:5], seed=0,
                      images=ImageInputs(pixels, grids))
    seq = _llm(path).run([request])[0]
    assert seq.token_ids[len(ids) + 5:] == expected[5:]


def test_images_that_do_not_fit_the_prompt_are_one_line_errors(vlms, qwen2_dir):
    path, hf = vlms["qwen2_5_vl"]
    ids, pixels, grids = _prompt(hf.config)
    llm = _llm(path)
    for images, match in ((None, r"^prompts\[0\]: an image placeholder run at token 1 but only 0"),
                          (ImageInputs(pixels[:24], grids[:1]), r"^prompts\[0\]: .* but only 1")):
        with pytest.raises(ValueError, match=match) as caught:
            llm.generate([ids.tolist()], GREEDY, images=[images])
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"^prompts\[0\] has images but the model \(qwen2\)"):
        LLM(qwen2_dir, kv_cache_memory=1 << 22).generate(
            [[1, 2, 3]], GREEDY, images=[ImageInputs(pixels, grids)])


def test_the_image_digest_follows_pixels_and_grids():
    pixels, grids = torch.randn(4, 96), torch.tensor([[1, 2, 2]])
    key = image_digest(ImageInputs(pixels, grids))
    assert key == image_digest(ImageInputs(pixels.clone(), grids))
    assert key != image_digest(ImageInputs(pixels + 1, grids))
    assert key != image_digest(ImageInputs(pixels, torch.tensor([[1, 1, 4]])))
    assert key != image_digest(ImageInputs(pixels.bfloat16(), grids))


def test_rollout_logprobs_are_training_logprobs_under_the_vision_mask(vlms):
    """Sampled answers' log-probs from the engine equal a training forward's over prompt + answer
    with the same images, the LM head's log-probs taken with the model's logit_bias (the sampler's
    mask); fp32, not the exact mode, so to rounding."""
    path, hf = vlms["qwen2_5_vl"]
    ids, pixels, grids = _prompt(hf.config)
    llm = _llm(path)
    out = llm.generate([ids.tolist()], SamplingParams(temperature=1.0, max_new_tokens=8, n=2,
                                                      seed=3),
                       images=[ImageInputs(pixels, grids)])[0].outputs
    model = llm.model
    for completion in out:
        full = torch.cat([ids, torch.tensor(completion.token_ids)])
        with torch.no_grad():
            hidden = model.forward_packed(full, [len(full)], pixel_values=pixels,
                                          image_grid_thw=grids)
            logp = linear_token_logprobs(hidden[len(ids) - 1:-1], model.lm_head.weight,
                                         full[len(ids):], bias=model.logit_bias())
        torch.testing.assert_close(logp, torch.tensor(completion.logprobs), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_mode_rollout_logprobs_are_training_logprobs_bit_for_bit(vlms, family):
    """batch_invariant: each sampled token's log-prob equals, bitwise, what the trainer's exact
    forward (packed_hidden with the same images, both answers in one pack) and head_logprobs with
    the sampler's mask give for it."""
    path, hf = vlms[family]
    ids, pixels, grids = _prompt(hf.config)
    llm = _llm(path, batch_invariant=True)
    out = llm.generate([ids.tolist()], SamplingParams(temperature=1.0, max_new_tokens=6, n=2,
                                                      seed=4),
                       images=[ImageInputs(pixels, grids)])[0].outputs
    mode, model = llm.batch_invariant, llm.model
    rows = [torch.cat([ids, torch.tensor(c.token_ids)]) for c in out]
    with torch.no_grad():
        hidden = mode.packed_hidden(model, torch.cat(rows), [len(r) for r in rows],
                                    pixel_values=torch.cat([pixels, pixels]),
                                    image_grid_thw=torch.cat([grids, grids]))
    start = 0
    for row, completion in zip(rows, out):
        answer = slice(start + len(ids) - 1, start + len(row) - 1)
        logp = mode.head_logprobs(hidden[answer], model.lm_head.weight, row[len(ids):],
                                  temperature=1.0, masked=model.config.vision.vision_token_ids)
        assert torch.equal(logp, torch.tensor(completion.logprobs))
        start += len(row)


def test_the_decode_graph_path_keeps_the_offsets(vlms):
    """The CUDA-graph path's persistent buffers (replayed eagerly here): decode positions carry each
    sequence's offset into padded batches; an image prompt and a text prompt decode together."""
    from fusedrl.engine.inference.decode_graphs import DecodeGraphs

    path, hf = vlms["qwen3_vl"]
    ids, pixels, grids = _prompt(hf.config)
    llm = _llm(path, max_num_seqs=4)
    llm.runner.graphs = DecodeGraphs(llm.runner, max_num_seqs=4, capture=False)
    text = [40, 41, 42]
    outs = llm.generate([ids.tolist(), text], GREEDY, images=[ImageInputs(pixels, grids), None])
    with torch.no_grad():
        plain = hf.generate(input_ids=torch.tensor([text]), max_new_tokens=NEW, do_sample=False,
                            suppress_tokens=_vision_ids(hf.config))[0, len(text):].tolist()
    assert [o.outputs[0].token_ids for o in outs] == [_hf_greedy(hf, ids, pixels, grids), plain]


def test_the_sampler_never_emits_the_tokenizers_vision_pad(tmp_path):
    """`<|vision_pad|>` is not in config.json but the data refuses it in any text, so the sampler
    masks it with the four vision ids: here its lm_head row is set to win the first greedy step
    (transformers, suppressing only the four, emits it), and the engine never samples it."""
    from vision_testing import save_vlm_with_processor

    hf, processor = save_vlm_with_processor(tmp_path)
    pad = processor.tokenizer.convert_tokens_to_ids("<|vision_pad|>")
    ids, pixels, grids = image_prompt(hf.config, [[7, 8], [9]], [(1, 4, 6), (1, 4, 4)])
    with torch.no_grad():
        out = hf(**hf_inputs(hf.config, ids, pixels, grids), output_hidden_states=True)
        last = out.hidden_states[-1][0, -1]
        hf.lm_head.weight[pad] = last * (out.logits[0, -1].max() + 10) / last.dot(last)
    hf.save_pretrained(tmp_path)
    assert _hf_greedy(hf, ids, pixels, grids)[0] == pad
    (answer,) = _llm(tmp_path).generate([ids.tolist()], GREEDY,
                                        images=[ImageInputs(pixels, grids)])[0].outputs
    assert len(answer.token_ids) == NEW and pad not in answer.token_ids

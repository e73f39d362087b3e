"""Qwen2.5-VL and Qwen3-VL against transformers: logits on images and text, M-RoPE positions,
checkpoint layouts (single, sharded, exported) and the one-line errors of tokens and images that
disagree."""
import pytest
import torch
import transformers

from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.model.vision.tiny import tiny_vlm_config
from fusedrl.engine.model.vision_language import VisionLanguageModel
from fusedrl.kernels import use_backend
from kernel_testing import needs_triton
from vision_testing import FAMILIES, hf_inputs, image_prompt, save_vlm
from vision_testing import vlms  # noqa: F401 (the fixture)

# fp32 on the CPU, the same ops in the same order on both sides (the tower is transformers' own).
ATOL = 1e-4
GRIDS = [(1, 4, 6), (1, 8, 4)]  # two images: 6 and 8 placeholder tokens


def _prompt(config, seed=0):
    return image_prompt(config, [[7, 8, 9], [10, 11, 12, 13]], GRIDS, seed)


def _hf_logits(hf, ids, pixels, grids):
    with torch.no_grad():
        return hf(**hf_inputs(hf.config, ids, pixels, grids)).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_two_images(vlms, family):
    path, hf = vlms[family]
    model = load_model(path)
    assert isinstance(model, VisionLanguageModel)
    ids, pixels, grids = _prompt(hf.config)
    with torch.no_grad():
        actual = model.compute_logits(model.forward_packed(ids, [len(ids)], pixel_values=pixels,
                                                           image_grid_thw=grids))
    torch.testing.assert_close(actual, _hf_logits(hf, ids, pixels, grids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_sequences_with_and_without_images(vlms, family):
    """Two image prompts and a text one in one pack: each row's logits are its own forward's."""
    path, hf = vlms[family]
    model = load_model(path)
    first, second = _prompt(hf.config, 1), image_prompt(hf.config, [[20, 21]], [(1, 2, 2)], 2)
    text = torch.tensor([30, 31, 32, 33])
    ids = torch.cat([first[0], text, second[0]])
    lens = [len(first[0]), len(text), len(second[0])]
    with torch.no_grad():
        logits = model.compute_logits(model.forward_packed(
            ids, lens, pixel_values=torch.cat([first[1], second[1]]),
            image_grid_thw=torch.cat([first[2], second[2]])))
        text_ref = hf(input_ids=text[None]).logits[0]
    rows = logits.split(lens)
    torch.testing.assert_close(rows[0], _hf_logits(hf, *first), atol=ATOL, rtol=0)
    torch.testing.assert_close(rows[1], text_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(rows[2], _hf_logits(hf, *second), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_mrope_positions_and_decode_offset_match_get_rope_index(vlms, family):
    path, hf = vlms[family]
    model = load_model(path)
    ids, _, grids = _prompt(hf.config)
    inputs = hf_inputs(hf.config, ids, None, grids)
    expected, delta = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                              image_grid_thw=grids)
    positions, deltas = model.mrope_positions(ids, [len(ids)], grids)
    assert torch.equal(positions, expected[:, 0])
    assert deltas == [int(delta)] and deltas[0] < 0  # images take fewer positions than tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_transformers_with_the_same_logits(vlms, family, tmp_path):
    path, hf = vlms[family]
    save_model(load_model(path), tmp_path / "out", source_dir=path)
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    ids, pixels, grids = _prompt(hf.config)
    torch.testing.assert_close(_hf_logits(back, ids, pixels, grids),
                               _hf_logits(hf, ids, pixels, grids), atol=0, rtol=0)


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_vlm(tmp_path, "qwen3_vl", seed=3, max_shard_size="50KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = load_model(tmp_path)
    ids, pixels, grids = _prompt(hf.config)
    with torch.no_grad():
        actual = model.compute_logits(model.forward_packed(ids, [len(ids)], pixel_values=pixels,
                                                           image_grid_thw=grids))
    torch.testing.assert_close(actual, _hf_logits(hf, ids, pixels, grids), atol=ATOL, rtol=0)


def _one_line_error(model, ids, pixels, grids, match):
    with pytest.raises(ValueError, match=match) as caught:
        model.forward_packed(ids, [len(ids)], pixel_values=pixels, image_grid_thw=grids)
    assert "\n" not in str(caught.value)


def test_tokens_and_images_that_disagree_are_one_line_errors(vlms):
    path, hf = vlms["qwen2_5_vl"]
    model, c = load_model(path), hf.config
    ids, pixels, grids = _prompt(c)
    cut = torch.cat([ids[:3], ids[4:]])  # one placeholder of the first image dropped
    _one_line_error(model, cut, pixels, grids, r"image 0's placeholder run at token 1 is 5 tokens")
    _one_line_error(model, ids, pixels[:24], grids[:1],
                    r"2 image placeholder run\(s\)|only 1 image")
    _one_line_error(model, ids, None, None, r"but only 0 image")
    _one_line_error(model, torch.cat([ids, torch.tensor([c.video_token_id])]), pixels, grids,
                    "videos are not supported")
    _one_line_error(model, ids, pixels[:-1], grids, r"pixel_values: shape \(55, 96\), expected \(56, 96\)")


@needs_triton
def test_the_triton_walk_matches_transformers(vlms):
    """The fused kernels' walk (M-RoPE inside the rotary kernel) on the same prompt."""
    path, hf = vlms["qwen3_vl"]
    model = load_model(path)
    ids, pixels, grids = _prompt(hf.config)
    with torch.no_grad(), use_backend("triton"):
        actual = model.compute_logits(model.forward_packed(ids, [len(ids)], pixel_values=pixels,
                                                           image_grid_thw=grids))
    torch.testing.assert_close(actual, _hf_logits(hf, ids, pixels, grids), atol=ATOL, rtol=0)


def test_tied_embeddings_load_and_export(tmp_path):
    """Qwen2.5-VL-3B's layout: the LM head is the embedding (no lm_head tensor saved)."""
    torch.manual_seed(0)
    config = tiny_vlm_config("qwen2_5_vl", vocab_size=300, tie_word_embeddings=True)
    hf = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path / "in")
    model = load_model(tmp_path / "in")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, pixels, grids = _prompt(config)
    with torch.no_grad():
        actual = model.compute_logits(model.forward_packed(ids, [len(ids)], pixel_values=pixels,
                                                           image_grid_thw=grids))
    expected = _hf_logits(hf, ids, pixels, grids)
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    save_model(model, tmp_path / "out", source_dir=tmp_path / "in")
    back = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(_hf_logits(back.eval(), ids, pixels, grids), expected, atol=0,
                               rtol=0)

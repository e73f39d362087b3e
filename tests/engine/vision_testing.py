"""Shared helpers for the vision-language tests: tiny random Qwen2.5-VL and Qwen3-VL models saved by
transformers (engine/model/vision/tiny.py's configs, weights widened so greedy argmaxes are well
separated), and prompts of text and images as transformers' processor lays them out."""
import pytest
import torch

from fusedrl.engine.model.vision.tiny import FAMILIES, tiny_vlm_config
from engine_testing import hf_class, make_tokenizer

VOCAB = 300
# family -> transformers' class, by name (engine_testing imports transformers on first use)
HF_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration"}
# pixel columns of one patch: 3 channels x 2 frames x 4 x 4 pixels
PATCH_WIDTH = 3 * 2 * 4 * 4


def make_vlm(family: str, seed: int = 0):
    """A transformers VLM of `family` on the tiny config (eos: the test tokenizer's </s>)."""
    torch.manual_seed(seed)
    model = hf_class(HF_CLASSES[family])(tiny_vlm_config(family, vocab_size=VOCAB, eos_token_id=5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model


def save_vlm(path, family: str, seed: int = 0, **save_kwargs):
    """Save make_vlm(family, seed) with the test tokenizer into `path` -> the transformers model."""
    model = make_vlm(family, seed)
    model.save_pretrained(path, **save_kwargs)
    make_tokenizer().save_pretrained(path)
    return model


def image_prompt(config, text_ids, grids, seed=0):
    """(input_ids [L], pixel_values [P, PATCH_WIDTH], image_grid_thw [I, 3]): each image of
    `grids` (patches (t, h, w)) as vision start, its placeholders, vision end, then text_ids[i];
    random pixels."""
    ids = []
    for grid, text in zip(grids, text_ids):
        t, h, w = grid
        ids += [config.vision_start_token_id] + [config.image_token_id] * (t * h * w // 4)
        ids += [config.vision_end_token_id] + list(text)
    gen = torch.Generator().manual_seed(seed)
    patches = sum(t * h * w for t, h, w in grids)
    return (torch.tensor(ids), torch.randn(patches, PATCH_WIDTH, generator=gen),
            torch.tensor(grids))


def hf_inputs(config, input_ids, pixel_values, grids) -> dict:
    """transformers' forward / generate arguments for one prompt."""
    return dict(input_ids=input_ids[None], pixel_values=pixel_values, image_grid_thw=grids,
                mm_token_type_ids=(input_ids == config.image_token_id).int()[None])


def save_vlm_with_processor(path, family: str = "qwen2_5_vl", seed: int = 0):
    """A tiny VLM of `family` over the vision demo's word-level tokenizer and image processor
    (engine/demos/vision_task.py), saved with both into `path` -> (transformers model,
    VisionProcessor)."""
    from fusedrl.engine.demos.vision_task import build_vision_processor

    processor = build_vision_processor()
    vocab = processor.tokenizer.get_vocab()
    torch.manual_seed(seed)
    config = tiny_vlm_config(family, vocab_size=len(vocab), image_token_id=vocab["<|image_pad|>"],
                             eos_token_id=vocab["</s>"])
    model = hf_class(HF_CLASSES[family])(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def vision_demo_run(root, held_out: int = 2):
    """What an RL test with images starts from: the vision demo's processor, its data for 8
    pictures (and `held_out` held-out tasks) written under root/data, and its tiny Qwen2.5-VL
    saved under root/base -> (base directory, write_vision_data's dict, processor)."""
    from fusedrl.engine.demos.vision import build_vision_model
    from fusedrl.engine.demos.vision_task import build_vision_processor, write_vision_data

    processor = build_vision_processor()
    data = write_vision_data(8, held_out, 0.0, 0, root / "data")
    return build_vision_model(root / "base", 0, processor), data, processor


__all__ = ["FAMILIES", "VOCAB", "make_vlm", "save_vlm", "image_prompt", "hf_inputs",
           "save_vlm_with_processor", "vision_demo_run"]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """family -> (directory, transformers model)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = (path, save_vlm(path, family))
    return out

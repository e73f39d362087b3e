"""A vision-language GRPO rollout: P prompts, each one image and a few text tokens, n sampled answers
per prompt, through our engine (the tower once per prompt, its n samples sharing it and the
prompt's KV) and through transformers' `generate` (num_return_sequences=n) on the same checkpoint.

The model is built in code, random weights, nothing downloaded: on a GPU Qwen2.5-VL-3B's text
decoder (36 layers, hidden 2,048, vocabulary 151,936) under a small vision tower (8 of the 3B
tower's 32 blocks, its widths, 224 x 224 images = 64 image tokens); --quick: engine/model/vision/
tiny.py's tiny Qwen2.5-VL (8 x 8 patches = 16 image tokens). The vision tower's seconds are timed
apart (a synchronizing wrapper around its forward), so each row says the tower's share.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

from fusedrl.bench import timing

# Qwen2.5-VL-3B's text decoder (its published config.json) and its vision ids.
QWEN25_VL_3B_TEXT = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                         num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=128000, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, eos_token_id=151645,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]})
QWEN25_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                     vision_end_token_id=151653)
# The 3B tower's widths, 8 blocks (two of them full attention, as the 32 have four).
SMALL_TOWER = dict(depth=8, hidden_size=1280, intermediate_size=3420, num_heads=16,
                   out_hidden_size=2048, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3, window_size=112,
                   fullatt_block_indexes=[3, 7])


@dataclasses.dataclass(frozen=True)
class Rollout:
    """prompts (one image each, `grid` patches (t, h, w)), text tokens after the image, samples
    per prompt, new tokens per sample."""
    prompts: int
    text_tokens: int
    samples: int
    new_tokens: int
    grid: tuple[int, int, int]


FULL = Rollout(prompts=16, text_tokens=64, samples=8, new_tokens=256, grid=(1, 16, 16))
QUICK = Rollout(prompts=2, text_tokens=8, samples=4, new_tokens=16, grid=(1, 8, 8))


def vlm_config(quick: bool):
    """The transformers Qwen2_5_VLConfig of the row's model (see the module's docstring)."""
    from fusedrl.engine.model.vision.tiny import tiny_vlm_config
    if quick:
        return tiny_vlm_config("qwen2_5_vl", vocab_size=512)
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(text_config=QWEN25_VL_3B_TEXT, vision_config=SMALL_TOWER,
                            **QWEN25_VL_IDS)


def build(quick: bool, seed: int, dtype: torch.dtype, device: torch.device):
    """(checkpoint directory, transformers model on `device`, eval): random init, seeded."""
    from transformers import Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(device):
        hf = Qwen2_5_VLForConditionalGeneration(vlm_config(quick)).to(dtype).eval()
    path = Path(tempfile.mkdtemp(prefix="fusedrl_bench_vlm_"))
    hf.save_pretrained(path)
    return path, hf


def prompts(config, shape: Rollout, seed: int) -> tuple[list[list[int]], list]:
    """(token ids per prompt: vision start, the image's placeholders, vision end, random text;
    ImageInputs per prompt: random pixels of one `shape.grid` image)."""
    from fusedrl.engine.data.vision_processor import ImageInputs
    vision = config.vision_config
    merge = vision.spatial_merge_size ** 2
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    t, h, w = shape.grid
    g = torch.Generator().manual_seed(seed)
    text_vocab = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                     config.vision_end_token_id)
    ids, images = [], []
    for _ in range(shape.prompts):
        text = torch.randint(0, text_vocab, (shape.text_tokens,), generator=g).tolist()
        ids.append([config.vision_start_token_id] + [config.image_token_id] * (t * h * w // merge)
                   + [config.vision_end_token_id] + text)
        images.append(ImageInputs(torch.randn(t * h * w, width, generator=g),
                                  torch.tensor([shape.grid])))
    return ids, images


@contextlib.contextmanager
def timed_calls(owner, attr: str, device: torch.device, spent: list) -> Iterator[None]:
    """owner.attr wrapped: each call's seconds (synchronized on a GPU) appended to spent."""
    inner, own = getattr(owner, attr), attr in vars(owner)

    def wrapper(*args, **kwargs):
        timing.synchronize(device)
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        timing.synchronize(device)
        spent.append(time.perf_counter() - start)
        return out

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        if own:
            setattr(owner, attr, inner)
        else:
            delattr(owner, attr)


def time_ours(llm, ids, images, shape: Rollout, seed: int, device) -> dict:
    """One rollout through our engine: seconds, tower seconds and runs, sampled tokens."""
    from fusedrl.engine.inference.sampling_params import SamplingParams
    params = SamplingParams(temperature=1.0, max_new_tokens=shape.new_tokens, n=shape.samples,
                            ignore_eos=True, seed=seed)
    tower: list[float] = []
    with timed_calls(llm.model, "encode_images", device, tower):
        timing.synchronize(device)
        start = time.perf_counter()
        outputs = llm.generate(ids, params, decode_text=False, images=images)
        seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    assert tokens == shape.prompts * shape.samples * shape.new_tokens, tokens
    return dict(seconds=seconds, tower_s=sum(tower), tower_runs=len(tower), tokens=tokens)


def time_hf(hf, ids, images, shape: Rollout, device) -> dict:
    """The same rollout through transformers' generate: every prompt in one batch (equal lengths),
    num_return_sequences=n, sampling at temperature 1, exactly new_tokens each."""
    input_ids = torch.tensor(ids, device=device)
    pixels = torch.cat([i.pixel_values for i in images]).to(device, hf.dtype)
    grids = torch.cat([i.image_grid_thw for i in images]).to(device)
    kwargs = dict(pixel_values=pixels, image_grid_thw=grids,
                  mm_token_type_ids=(input_ids == hf.config.image_token_id).int(),
                  attention_mask=torch.ones_like(input_ids), do_sample=True, temperature=1.0,
                  top_k=0, top_p=1.0, num_return_sequences=shape.samples, pad_token_id=0,
                  max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens)
    tower: list[float] = []
    with timed_calls(hf.model.visual, "forward", device, tower), torch.no_grad():
        timing.synchronize(device)
        start = time.perf_counter()
        out = hf.generate(input_ids, **kwargs)
        timing.synchronize(device)
        seconds = time.perf_counter() - start
    assert out.shape == (shape.prompts * shape.samples, input_ids.shape[1] + shape.new_tokens)
    return dict(seconds=seconds, tower_s=sum(tower), tower_runs=len(tower),
                tokens=shape.prompts * shape.samples * shape.new_tokens)

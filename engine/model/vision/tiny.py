"""Tiny Qwen2.5-VL and Qwen3-VL configs built in code: the parity tests' models and the vision
demo's, saved with transformers (`Qwen2_5_VLForConditionalGeneration(config).save_pretrained(dir)`,
or Qwen3VLForConditionalGeneration), nothing downloaded."""
from __future__ import annotations

FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def tiny_vlm_config(family: str, vocab_size: int = 256, image_token_id: int | None = None,
                    **text_overrides):
    """A transformers Qwen2_5_VLConfig or Qwen3VLConfig (`family`) with a 2-layer, 64-wide decoder
    over `vocab_size` tokens and a 2-block, 32-wide vision tower of 4x4 patches merged 2x2 (an
    image of 8x8 pixels is one token; 16x24 pixels are 2 x 3). The four vision ids are the
    vocabulary's last four (image placeholder, video, vision start, vision end) unless
    image_token_id places them from there on. text_overrides: text_config fields."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}, expected one of {FAMILIES}")
    first = vocab_size - 4 if image_token_id is None else image_token_id
    if not 0 <= first <= vocab_size - 4:
        raise ValueError(f"image_token_id={image_token_id}: the four vision ids must fit below "
                         f"vocab_size={vocab_size}")
    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=512, bos_token_id=None, eos_token_id=0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})
    text.update(text_overrides)
    vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                  out_hidden_size=text["hidden_size"], patch_size=4, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    ids = dict(image_token_id=first, video_token_id=first + 1, vision_start_token_id=first + 2,
               vision_end_token_id=first + 3)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig
        vision.update(window_size=16, fullatt_block_indexes=[1])
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    from transformers import Qwen3VLConfig
    text["rope_parameters"]["mrope_interleaved"] = True
    vision.update(num_position_embeddings=64, deepstack_visual_indexes=[0])
    return Qwen3VLConfig(text_config=text, vision_config=vision, **ids)

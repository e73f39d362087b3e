"""The vision half of a vision-language model (Qwen2.5-VL, Qwen3-VL): what config.json says about
it (spec.py), its M-RoPE positions (mrope.py) and its tower (tower.py). Nothing here imports the
decoder; engine/model/vision_language.py joins the two."""

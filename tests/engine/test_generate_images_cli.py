"""`fusedrl generate --image FILE` on a vision-language model directory: the prompt opens with the
images (or renders them through the chat template) and the greedy answer is transformers'."""
import json

import pytest
import torch
from PIL import Image

from fusedrl.engine import cli
from fusedrl.engine.demos.vision_task import draw
from vision_testing import hf_inputs, save_vlm_with_processor


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm")
    model, processor = save_vlm_with_processor(path)
    pictures = []
    for i, cells in enumerate((["red", None, "blue", "red"], ["green", "green", None, None])):
        pictures.append(path / f"picture{i}.png")
        draw(cells).save(pictures[-1])
    return path, model, processor, pictures


def _run(capsys, path, pictures, *extra):
    argv = ["generate", "--model", str(path), "--prompt", "how many red ?", "--temperature", "0",
            "--max-new-tokens", "6", "--json", "--no-progress", "--device", "cpu", *extra]
    for picture in pictures:
        argv += ["--image", str(picture)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("chat_template", [False, True])
def test_greedy_generation_with_two_images_is_transformers(vlm, capsys, chat_template):
    path, model, processor, pictures = vlm
    (row,) = _run(capsys, path, pictures, *(["--chat-template"] if chat_template else []))
    images = [Image.open(p).convert("RGB") for p in pictures]
    parts = [{"type": "image"}] * 2 + [{"type": "text", "text": "how many red ?"}]
    text = (processor.render([{"role": "user", "content": parts}], True) if chat_template
            else "<|vision_start|><|image_pad|><|vision_end|>" * 2 + "how many red ?")
    ids, pixels = processor.encode(text, images)
    c = model.config
    out = model.generate(**hf_inputs(c, torch.tensor(ids), pixels.pixel_values,
                                     pixels.image_grid_thw), max_new_tokens=6, do_sample=False,
                         suppress_tokens=[c.image_token_id, c.video_token_id,
                                          c.vision_start_token_id, c.vision_end_token_id])
    assert row["token_ids"] == out[0, len(ids):].tolist() and len(row["token_ids"]) > 1
    assert row["prompt"] == "how many red ?"


def test_an_unreadable_image_is_one_line(vlm, tmp_path, capsys):
    path = vlm[0]
    bad = tmp_path / "not.png"
    bad.write_text("text")
    code = cli.main(["generate", "--model", str(path), "--prompt", "hi", "--image", str(bad),
                     "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "--image: images[0] cannot be read" in err

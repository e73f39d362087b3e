"""Vision rows (TRL's formats) -> processed samples: the placeholders expanded once from the image
processor's grids, images never split by truncation, typed vision tokens refused, image counts
checked, with a real tokenizer and a real Qwen2-VL image processor built in code."""
import json
import re

import pytest
import torch

from fusedrl.engine.config.train import DataConfig
from fusedrl.engine.data.loading import load_examples
from fusedrl.engine.data.prompts import load_prompts
from fusedrl.engine.data.records import DataError
from fusedrl.engine.data.vision_processor import VisionProcessor
from fusedrl.engine.demos.vision_task import (build_image_processor, build_vision_processor,
                                              build_vision_tokenizer, draw)


@pytest.fixture(scope="module")
def processor():
    return build_vision_processor(["user", "assistant", "how", "many", "red", "?", "and", "a",
                                   "b", "c", "0", "1", "2", "3", "4"])


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


IMAGE, TEXT = {"type": "image"}, {"type": "text", "text": " how many red ?"}


def _write(tmp_path, rows, name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _picture(tmp_path, name="a.png", size=None, cells=("red", None, "red", "blue")):
    """A 24 x 16 picture (3 x 2 merged patches: 6 image tokens), or resized to size x size."""
    image = draw(list(cells))
    if size is not None:
        image = image.resize((size, size))
    image.save(tmp_path / name)
    return name


def test_expansion_matches_the_image_processors_grid(processor, tmp_path):
    """Each image part becomes its grid's t*h*w/merge^2 image tokens between one vision start and
    end; the pixels are the image processor's own output for the same pictures."""
    small, large = _picture(tmp_path, "s.png"), _picture(tmp_path, "l.png", size=32)
    path = _write(tmp_path, [{"prompt": _user(IMAGE, TEXT, IMAGE), "images": [small, large],
                              "answer": 2}])
    rows, _ = load_prompts(path, processor, max_prompt_length=128, max_model_len=256)
    row, = rows
    from PIL import Image
    reference = build_image_processor()(
        images=[Image.open(tmp_path / small).convert("RGB"),
                Image.open(tmp_path / large).convert("RGB")], return_tensors="pt")
    torch.testing.assert_close(row.images.pixel_values, reference["pixel_values"].float(),
                               rtol=0, atol=0)
    assert row.images.image_grid_thw.tolist() == [[1, 4, 6], [1, 8, 8]]
    ids, tok = row.ids, processor.tokenizer
    assert ids.count(processor.image_token_id) == 6 + 16
    start, end = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    first = ids.index(start)
    assert ids[first + 1:first + 8] == [processor.image_token_id] * 6 + [end]
    assert row.columns["answer"] == 2 and row.prompt == _user(IMAGE, TEXT, IMAGE)


def test_images_without_parts_go_before_the_first_user_text(processor, tmp_path):
    """TRL's rule for messages without image parts, and a string prompt: the images lead the user
    turn."""
    name = _picture(tmp_path)
    path = _write(tmp_path, [{"prompt": [{"role": "user", "content": "how many red ?"}],
                              "images": [name]},
                             {"prompt": "how many red ?", "image": name}])
    rows, _ = load_prompts(path, processor, max_prompt_length=128, max_model_len=256)
    assert rows[0].ids == rows[1].ids
    tok = processor.tokenizer
    text = tok.decode(rows[0].ids)
    assert text.index("<|vision_end|>") < text.index("how")


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<|video_pad|>"])
def test_typed_vision_tokens_are_refused(processor, tmp_path, token):
    """A literal vision token in text never becomes an image slot: the row is refused, naming it."""
    name = _picture(tmp_path)
    path = _write(tmp_path, [{"prompt": _user(IMAGE, TEXT), "images": [name]},
                             {"prompt": _user(IMAGE, {"type": "text", "text": f"a {token} b"}),
                              "images": [name]}])
    with pytest.raises(DataError, match=rf"rows.jsonl:2: .*literal '{re.escape(token)}'"):
        load_prompts(path, processor, max_prompt_length=128, max_model_len=256)
    # Nor as an answer SFT would teach the model to write.
    sft = _write(tmp_path, [{"prompt": _user(IMAGE, TEXT), "completion": f"1 {token}",
                             "images": [name]}], "sft.jsonl")
    with pytest.raises(DataError, match=r"sft.jsonl:1: .*literal"):
        load_examples(DataConfig(train_file=sft, max_length=64, max_prompt_length=32,
                                 tokens_per_batch=64), processor, "sft", 0)


def test_a_vision_token_split_over_text_parts_is_refused(processor, tmp_path):
    """The chat template writes a message's text parts one after the other: a token cut in two
    parts is the token, in a prompt and in an answer SFT would train."""
    name = _picture(tmp_path)
    split = [{"type": "text", "text": "3 <|vision_"}, {"type": "text", "text": "pad|> b"}]
    path = _write(tmp_path, [{"prompt": _user(IMAGE, *split), "images": [name]}])
    with pytest.raises(DataError, match=r"rows.jsonl:1: .*literal '<\|vision_pad\|>'"):
        load_prompts(path, processor, max_prompt_length=128, max_model_len=256)
    sft = _write(tmp_path, [{"prompt": _user(IMAGE, TEXT), "images": [name],
                             "completion": [{"role": "assistant", "content": split}]}], "sft.jsonl")
    with pytest.raises(DataError, match=r"sft.jsonl:1: .*literal '<\|vision_pad\|>'"):
        load_examples(DataConfig(train_file=sft, max_length=64, max_prompt_length=32,
                                 tokens_per_batch=64), processor, "sft", 0)
    # split by an image part: two texts, neither a token
    apart = [{"type": "text", "text": "<|vision_"}, IMAGE, {"type": "text", "text": "pad|>"}]
    ok = _write(tmp_path, [{"prompt": _user(*apart), "images": [name]}], "ok.jsonl")
    assert len(load_prompts(ok, processor, max_prompt_length=128, max_model_len=256)[0]) == 1


def test_chat_template_none_is_refused_for_a_vision_policy(processor, tmp_path):
    """Every prompt of a vision policy goes through its chat template (it writes each image's
    tokens): data.chat_template=none, which would keep string prompts as they are, is refused."""
    from fusedrl.engine.errors import UsageError
    path = _write(tmp_path, [{"prompt": " how many red ?"}])
    with pytest.raises(UsageError, match="data.chat_template=none with a vision-language policy"):
        load_prompts(path, processor, max_prompt_length=128, max_model_len=256,
                     chat_template="none")


def test_images_open_as_transformers_opens_them(tmp_path):
    """A path's EXIF orientation applied (transformers' load_image, datasets' Image); transparency
    over white (transformers' convert_to_rgb); a decompression bomb or a path that is not a
    string is a one-line data error."""
    from PIL import Image
    from transformers.image_transforms import convert_to_rgb
    from fusedrl.engine.data.vision_rows import open_image
    photo = Image.new("RGB", (32, 16), (10, 200, 30))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to view
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert open_image("phone.jpg", tmp_path).size == (16, 32)
    for image in (Image.new("RGBA", (4, 3), (255, 0, 0, 0)), Image.new("LA", (4, 3), (9, 128)),
                  Image.new("L", (4, 3), 77), Image.new("RGBA", (4, 3), (1, 2, 3, 255))):
        expected = convert_to_rgb(image)
        assert open_image(image, None).tobytes() == expected.tobytes(), image.mode
    palette = Image.new("P", (4, 3), 0)
    palette.info["transparency"] = 0
    assert open_image(palette, None).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match=r"images\[2\] is a dict"):
        open_image({"path": 123}, tmp_path, 2)
    Image.new("L", (1, 1)).save(tmp_path / "bomb.png")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 0  # any image is a bomb to PIL now
        with pytest.raises(ValueError, match=r"images\[0\] cannot be read as an image"):
            open_image("bomb.png", tmp_path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


@pytest.mark.parametrize("parts,images,message", [
    ((IMAGE, TEXT, IMAGE), 1, "2 image part\\(s\\) in the messages but 1 image"),
    ((IMAGE, TEXT), 2, "1 image part\\(s\\) in the messages but 2 image"),
])
def test_mismatched_image_counts_name_the_row(processor, tmp_path, parts, images, message):
    name = _picture(tmp_path)
    path = _write(tmp_path, [{"prompt": _user(TEXT), "images": [name]},
                             {"prompt": _user(*parts), "images": [name] * images}])
    with pytest.raises(DataError, match=rf"rows.jsonl:2: {message}"):
        load_prompts(path, processor, max_prompt_length=128, max_model_len=256)


def test_bad_images_name_the_row(processor, tmp_path):
    (tmp_path / "not.png").write_text("text")
    for images, message in (([3], r"images\[0\] is a int"),
                            (["gone.png"], r"images\[0\]: no image file"),
                            (["not.png"], r"images\[0\] cannot be read")):
        path = _write(tmp_path, [{"prompt": _user(IMAGE, TEXT), "images": images}])
        with pytest.raises(DataError, match=rf"rows.jsonl:1: {message}"):
            load_prompts(path, processor, max_prompt_length=128, max_model_len=256)


def test_truncation_never_splits_an_image(processor, tmp_path):
    """A prompt over its limit keeps its last tokens when the cut spares every vision token (leading
    text), and is dropped and counted when the cut would reach an image."""
    name = _picture(tmp_path)
    text_first = _user({"type": "text", "text": "a b c " * 10}, IMAGE, TEXT)
    image_first = _user(IMAGE, {"type": "text", "text": "a b c " * 10})
    path = _write(tmp_path, [{"prompt": text_first, "images": [name]},
                             {"prompt": image_first, "images": [name]}])
    rows, _ = load_prompts(path, processor, max_prompt_length=20, max_model_len=64)
    row, = rows
    assert len(row.ids) == 20 and row.ids.count(processor.image_token_id) == 6
    assert row.images.num_images == 1
    # Every row would be cut inside its image: refused as a whole, not trained on broken samples.
    with pytest.raises(DataError, match="no prompts left"):
        load_prompts(_write(tmp_path, [{"prompt": image_first, "images": [name]}], "b.jsonl"),
                     processor, max_prompt_length=20, max_model_len=64)


def test_sft_examples_carry_their_images(processor, tmp_path):
    """SFT rows in the three TRL shapes: prompt + completion strings, prompt + completion messages,
    messages ending with the answer; the response is the answer and EOS, the images the prompt's;
    a sample whose prompt cut would reach its image is dropped and counted."""
    name = _picture(tmp_path)
    rows = [{"prompt": "how many red ?", "completion": "2", "images": [name]},
            {"prompt": _user(IMAGE, TEXT), "completion": [{"role": "assistant", "content": "2"}],
             "images": [name]},
            {"messages": _user(IMAGE, TEXT) + [{"role": "assistant", "content": "2"}],
             "images": [name]},
            {"messages": _user(IMAGE, {"type": "text", "text": "a b c " * 20})
             + [{"role": "assistant", "content": "2"}], "images": [name]}]
    cfg = DataConfig(train_file=_write(tmp_path, rows), max_length=64, max_prompt_length=32,
                     tokens_per_batch=64, eval_fraction=0)
    examples = load_examples(cfg, processor, "sft", 0)
    assert examples.info["dropped_examples"] == 1 and len(examples.train) == 3
    tok = processor.tokenizer
    for ex in examples.train:
        assert ex.responses == ([tok.convert_tokens_to_ids("2"), tok.eos_token_id],)
        assert ex.prompt.count(processor.image_token_id) == 6
        assert ex.images.image_grid_thw.tolist() == [[1, 4, 6]]
    assert examples.train[1].prompt == examples.train[2].prompt


def test_an_image_in_the_trained_turn_is_refused(processor, tmp_path):
    name = _picture(tmp_path)
    row = {"messages": _user(TEXT) + [{"role": "assistant", "content": [IMAGE]}],
           "images": [name]}
    cfg = DataConfig(train_file=_write(tmp_path, [row]), max_length=64, max_prompt_length=32,
                     tokens_per_batch=64)
    with pytest.raises(DataError, match="rows.jsonl:1: the trained assistant turn holds an image"):
        load_examples(cfg, processor, "sft", 0)


def test_datasets_image_column_and_saved_processor(processor, tmp_path):
    """A datasets.Dataset with an Image feature (PIL on reading) gives the same sample as a path;
    the processor saved to a directory and read back encodes alike."""
    datasets = pytest.importorskip("datasets")
    name = _picture(tmp_path)
    data = datasets.Dataset.from_dict(
        {"prompt": [_user(IMAGE, TEXT)], "images": [[str(tmp_path / name)]]}).cast_column(
        "images", datasets.Sequence(datasets.Image()))
    processor.save_pretrained(tmp_path / "model")
    again = VisionProcessor.from_pretrained(tmp_path / "model")
    from_data, _ = load_prompts(data, again, max_prompt_length=64, max_model_len=128)
    path = _write(tmp_path, [{"prompt": _user(IMAGE, TEXT), "images": [name]}])
    from_file, _ = load_prompts(path, processor, max_prompt_length=64, max_model_len=128)
    assert from_data[0].ids == from_file[0].ids
    assert torch.equal(from_data[0].images.pixel_values, from_file[0].images.pixel_values)


def test_a_processor_needs_the_vision_tokens():
    tokenizer = build_vision_tokenizer()
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        VisionProcessor.from_pretrained(".")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")))
    with pytest.raises(ValueError, match="no '<\\|image_pad\\|>' token"):
        VisionProcessor(plain, build_image_processor())
    assert VisionProcessor(tokenizer, build_image_processor()).reserved_ids == frozenset(
        tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                                         "<|image_pad|>", "<|video_pad|>"]))

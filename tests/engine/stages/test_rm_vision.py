"""A vision-language reward model (`fusedrl rm` on rows with an `images` column): a tiny Qwen2.5-VL
learns which colour the picture's squares are (the chosen response names it, the rejected one
another colour, the question the same for every row), so only the image can tell the two apart;
it ranks held-out pictures far above chance, and its score of one answer moves with the picture
alone. The rows' rules (data/vision_rankings.py) are refused in one line."""
import dataclasses
import json
import math
import random

import pytest
import torch

from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.data.vision_rankings import parse_vision_ranking, tokenize_vision_ranking
from fusedrl.engine.demos.vision import build_vision_model
from fusedrl.engine.demos.vision_task import CELLS, COLOURS, WORDS, build_vision_processor, draw
from fusedrl.engine.model.reward_model import load_reward_model
from fusedrl.engine.model.vision_language import VisionLanguageModel
from fusedrl.engine.stages.rm import mean_raw_reward, train_rm, vision_references
from fusedrl.engine.train.runlog import read_metrics
from cli_testing import run_fusedrl
from train_testing import rm_config

QUESTION = "which colour ?"


def colour_processor():
    """The vision demo's processor over its words, the question's and the colours'."""
    return build_vision_processor(WORDS + ["which", "colour", *COLOURS])


def colour_rows(pictures, root, name, rng) -> str:
    """Rankings of `pictures` ((colour, cell mask) each: the mask's cells hold a square of that
    colour) into root/NAME.jsonl (PNGs beside it): chosen the colour, rejected another."""
    rows = []
    for i, (colour, mask) in enumerate(pictures):
        path = f"images/{name}{i}.png"
        draw([colour if mask >> k & 1 else None for k in range(CELLS)]).save(root / path)
        rows.append({"prompt": [{"role": "user", "content": [{"type": "image"},
                                                            {"type": "text", "text": QUESTION}]}],
                     "images": [path], "chosen": colour,
                     "rejected": rng.choice([c for c in COLOURS if c != colour])})
    out = root / f"{name}.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """150 training and 39 held-out pictures (none shared), 3 epochs: about 10 s of CPU time."""
    root = tmp_path_factory.mktemp("rm_vision")
    processor = colour_processor()
    base = build_vision_model(root / "base", 0, processor)
    rng = random.Random(0)
    pictures = [(c, m) for c in COLOURS for m in range(1, 2 ** CELLS)]
    rng.shuffle(pictures)
    (root / "images").mkdir()
    train, held = (colour_rows(pictures[:150], root, "train", rng),
                   colour_rows(pictures[150:], root, "held", rng))
    cfg = rm_config(base, train, root / "run", data={"eval_file": held, "tokens_per_batch": 256},
                    optim={"lr": 3e-3, "warmup_steps": 0}, train={"epochs": 3})
    return cfg, train_rm(cfg), processor


def test_vision_rm_learns_the_pictures_colour_to_held_out_accuracy(trained):
    cfg, final, _ = trained
    rows = read_metrics(cfg.output_dir)
    first = [r for r in rows if r["kind"] == "train"][0]
    assert first["rank_loss"] == pytest.approx(math.log(2))  # the zero head: every score 0
    final_eval = [r for r in rows if r["kind"] == "eval"][-1]
    assert final_eval["pairs"] == 39 and final_eval["accuracy"] >= 0.8, final_eval
    offset = [r for r in rows if "reward_offset" in r][-1]
    assert math.isfinite(offset["reward_offset"]) and offset["reference_responses"] == 150
    assert (final / "preprocessor_config.json").is_file()


def test_vision_rm_score_moves_with_the_picture_alone(trained):
    """One prompt and the answer "green": the exported reward model scores it higher beside a
    green picture than beside a red one of the same cells."""
    _, final, processor = trained
    rm = load_reward_model(final).eval()
    assert isinstance(rm, VisionLanguageModel)
    scores = []
    for colour in ("green", "red"):
        record = parse_vision_ranking(
            {"prompt": QUESTION, "images": [draw([colour, None, colour, None, None, colour])],
             "chosen": "green", "rejected": "blue"}, processor, None)
        example = tokenize_vision_ranking(processor, record, 48, 24)
        packed = pack_sequences([(example.prompt, example.responses[0], False)],
                                images=[example.images])
        scores.append(rm.packed_rewards(packed).item())
    right, wrong = scores
    assert right - wrong > 1.0, scores


def test_reference_file_rows_with_images_set_the_offset(trained, tmp_path):
    """reference_file's demonstrations with images (SFT rows) are the references: scored packed
    together, their mean is the mean of their scores one by one."""
    cfg, final, processor = trained
    (tmp_path / "images").mkdir()
    rows = [{"prompt": QUESTION, "completion": colour, "images": [f"images/{colour}.png"]}
            for colour in ("red", "green", "blue")]
    for colour in ("red", "green", "blue"):
        draw([colour] * CELLS).save(tmp_path / "images" / f"{colour}.png")
    (tmp_path / "ref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = dataclasses.replace(cfg, reference_file=str(tmp_path / "ref.jsonl"))
    sequences, images = vision_references(cfg, processor, [])
    assert len(sequences) == 3 and all(i.num_images == 1 for i in images)
    rm = load_reward_model(final)
    packed = mean_raw_reward(rm, sequences, 256, "cpu", images)
    with torch.no_grad():
        alone = [rm.raw_rewards(rm.forward_packed(torch.tensor(s), [len(s)],
                                                  pixel_values=i.pixel_values,
                                                  image_grid_thw=i.image_grid_thw),
                                [len(s)]).item() for s, i in zip(sequences, images)]
    assert packed == pytest.approx(sum(alone) / 3, abs=1e-5)
    assert max(alone) - min(alone) > 0.1  # three pictures, three scores


@pytest.mark.parametrize("row,error", [
    ({"prompt": QUESTION, "chosen": "red"}, "needs a prompt and chosen \\+ rejected"),
    ({"prompt": QUESTION, "chosen": "red", "rejected": "red"}, "must be distinct"),
    ({"prompt": QUESTION, "responses": ["red"]}, "at least two responses"),
    ({"prompt": QUESTION, "chosen": [{"role": "assistant", "content": [{"type": "image"}]}],
      "rejected": "blue"}, "chosen's content must be text"),
    ({"prompt": QUESTION, "chosen": "red <|image_pad|>", "rejected": "blue"},
     "a vision token"),
    ({"prompt": QUESTION, "chosen": [{"role": "user", "content": "red"}], "rejected": "blue"},
     "one assistant message"),
])
def test_vision_ranking_rows_are_refused_in_one_line(row, error):
    with pytest.raises(ValueError, match=error):
        parse_vision_ranking({**row, "images": [draw(["red"] + [None] * (CELLS - 1))]},
                             colour_processor(), None)


def test_a_ranking_shares_its_prompt_and_pixels_over_its_responses():
    processor = colour_processor()
    record = parse_vision_ranking(
        {"prompt": QUESTION, "images": [draw(["blue"] * CELLS)],
         "responses": ["blue", [{"role": "assistant", "content": "green"}], "red"]},
        processor, None)
    example = tokenize_vision_ranking(processor, record, 48, 24)
    assert len(example.responses) == 3 and example.images.num_images == 1
    assert example.prompt.count(processor.image_token_id) == CELLS  # one token per cell
    assert [processor.tokenizer.decode(r, skip_special_tokens=True) for r in example.responses
            ] == ["blue", "green", "red"]
    assert tokenize_vision_ranking(processor, record, 48, 5) is None  # a cut through the image
    batch = pack_sequences([(example.prompt, r, False) for r in example.responses],
                           images=[example.images] * 3)
    assert batch.image_counts == [1, 1, 1]
    assert torch.equal(batch.pixel_values, example.images.pixel_values.repeat(3, 1))


@pytest.mark.integration
def test_fusedrl_rm_command_on_rows_with_images(trained, tmp_path):
    """`fusedrl rm` on the JSONL rankings (images by path): two steps, the reward model exported
    with its processor, and loaded back as a vision-language reward model."""
    cfg, _, _ = trained
    out = tmp_path / "cli"
    result = run_fusedrl(
        "rm", f"model={cfg.model}", f"data.train_file={cfg.data.train_file}",
        f"output_dir={out}", "data.eval_fraction=0", "data.tokens_per_batch=256",
        "data.max_length=48", "data.max_prompt_length=24", "train.max_steps=2",
        "train.device=cpu", "train.progress=false", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final" / "preprocessor_config.json").is_file()
    assert isinstance(load_reward_model(out / "final"), VisionLanguageModel)

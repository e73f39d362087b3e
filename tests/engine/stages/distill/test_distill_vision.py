"""On-policy distillation of a tiny Qwen2.5-VL student from another Qwen2.5-VL teacher of the same
processor, on rows with images: the teacher reads each sampled row with the row's own processed
pixels (and the positions its ids and grids give), its log-probs under the sampler's vision mask,
in each divergence mode; a teacher that reads images otherwise is refused in one line."""
import json
import shutil

import pytest
import torch

from fusedrl.engine.config.distill import DistillConfig, DistillSection
from fusedrl.engine.config.ppo import LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.data.prompts import load_prompts
from fusedrl.engine.demos.vision import build_vision_model
from fusedrl.engine.demos.vision_task import build_vision_processor, write_vision_data
from fusedrl.engine.errors import ConfigValueError, UsageError
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.stages.distill import trainer
from fusedrl.engine.stages.distill.teacher import load_teacher, score_with_teacher
from fusedrl.engine.train.runlog import read_metrics
from engine_testing import make_hf_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A student and a teacher (another seed) over the vision demo's processor, and its prompts."""
    root = tmp_path_factory.mktemp("distill_vision")
    processor = build_vision_processor()
    student = build_vision_model(root / "student", 0, processor)
    teacher = build_vision_model(root / "teacher", 1, processor)
    data = write_vision_data(8, 2, 0.0, 0, root / "data")
    return root, student, teacher, data, processor


def config(setup, name, teacher=None, **fields):
    root, student, default_teacher, data, _ = setup
    defaults = dict(
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=3,
                              kv_cache_memory=1 << 22, max_prompt_length=20),
        ppo=UpdateConfig(estimator="grpo", kl_loss_coef=0.0, vf_coef=0.0, epochs=1,
                         minibatch_size=2),
        train=LoopConfig(iterations=1, progress=False, device="cpu", resume=False))
    return DistillConfig(policy=student, teacher=teacher or default_teacher,
                         prompts_file=data["prompts"], output_dir=str(root / name),
                         **{**defaults, **fields})


def prompt_pixels(data, processor) -> list[torch.Tensor]:
    rows, _ = load_prompts(data["prompts"], processor, 20, 64)
    return [row.images.pixel_values for row in rows]


@pytest.mark.parametrize("mode", ["full", "top_k", "sampled"])
def test_vision_distillation_runs_with_the_teacher_reading_the_rows_images(setup, mode,
                                                                           monkeypatch):
    root, _, _, data, processor = setup
    seen = []
    load = trainer.load_teacher

    def load_and_watch(*args, **kwargs):
        teacher = load(*args, **kwargs)
        teacher.model.visual.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
        return teacher

    monkeypatch.setattr(trainer, "load_teacher", load_and_watch)
    trainer.train_distill(config(setup, mode, distill=DistillSection(mode=mode, top_k=8)))
    rows = [r for r in read_metrics(root / mode) if r["kind"] == "train"]
    assert len(rows) == 1 and rows[0]["updates"] == 2  # two minibatches of two rows
    assert all(torch.isfinite(torch.tensor(rows[0][k])) for k in ("divergence", "teacher_logprob"))
    known = prompt_pixels(data, processor)
    assert seen  # the teacher's forward over the iteration's rows
    for pixels in seen:
        for chunk in pixels.split(known[0].shape[0]):
            assert any(torch.equal(chunk, p) for p in known)


def test_the_teachers_log_probs_move_with_the_image_and_skip_the_vision_tokens(setup):
    """score_with_teacher over one prompt and answer beside two different pictures gives two
    different log-probs; a vision token as the answer has log-prob -inf (the sampler's mask)."""
    _, _, teacher_dir, data, processor = setup
    teacher = load_teacher(teacher_dir, torch.float32, "cpu", ParallelDims())
    rows, _ = load_prompts(data["prompts"], processor, 20, 64)
    first, second = rows[0], next(r for r in rows[1:] if not torch.equal(
        r.images.pixel_values, rows[0].images.pixel_values))
    # an answer, then the tokenizer's vision pad: a vision token the sampler never draws
    answer = processor.tokenizer.encode("3", add_special_tokens=False) + [
        processor.tokenizer.convert_tokens_to_ids("<|vision_pad|>")]
    packed = pack_sequences([(first.ids, answer, True)] * 2, width=len(answer),
                            images=[first.images, second.images])
    scores = score_with_teacher(teacher, packed, 1.0, None)
    logp = scores.logprobs.view(2, 2)
    assert (logp[0, 0] - logp[1, 0]).abs() > 1e-4
    assert torch.isneginf(logp[:, 1]).all() and torch.isfinite(logp[:, 0]).all()


def test_a_teacher_that_reads_images_otherwise_is_refused(setup, tmp_path):
    root, student, teacher, _, processor = setup
    # a text model of the student's vocabulary and tokenizer
    text_teacher = tmp_path / "text"
    make_hf_model("llama2", vocab_size=len(processor.tokenizer)).save_pretrained(text_teacher)
    processor.tokenizer.save_pretrained(text_teacher)
    with pytest.raises(UsageError, match="is a text model but the student .policy. is a "
                                         "vision-language model"):
        trainer.startup_checks(config(setup, "text", teacher=str(text_teacher)), "cpu", 1)
    other = tmp_path / "other_processor"
    shutil.copytree(teacher, other)
    settings = json.loads((other / "preprocessor_config.json").read_text())
    settings["image_mean"] = [0.5, 0.5, 0.5]
    (other / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(UsageError, match="image processor differs from the student's in "
                                         "'image_mean'"):
        trainer.startup_checks(config(setup, "other", teacher=str(other)), "cpu", 1)
    with pytest.raises(ConfigValueError, match="distill.lmbda=0.5 with a vision-language model"):
        trainer.train_distill(config(setup, "gkd", distill=DistillSection(lmbda=0.5)))

"""GRPO of a tiny Qwen2.5-VL on rows with an `images` column, scored by a TRL-style reward function
reading the rows' columns: the run goes to the end, its prompts reach the engine with their images,
each group's rows read their prompt once in training (prefix sharing), and no sampled token is one
of the model's vision tokens (the random base model would sample one in about every sixth token if
the sampler did not mask them)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.demos.vision_task import count_reward
from fusedrl.engine.model.hf_io import load_config
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from cli_testing import run_fusedrl
from vision_testing import vision_demo_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_vision")
    return (root, *vision_demo_run(root))


def test_grpo_with_images_runs_and_never_samples_a_vision_token(setup):
    root, base, data, processor = setup
    seen = []

    def reward(prompts, completions, completion_ids, answer, images, **_):
        seen.append((completion_ids, answer, images))
        return count_reward(completions, answer)

    cfg = GRPOConfig(
        policy=base, prompts_file=data["prompts"], output_dir=str(root / "grpo"), seed=0,
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=4, max_new_tokens=3,
                              kv_cache_memory=1 << 22, max_prompt_length=20),
        ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=8, vf_coef=0.0),
        optim=OptimConfig(lr=1e-2),
        train=LoopConfig(iterations=2, progress=False, device="cpu", resume=False))
    cfg.reward.isolation = "thread"
    train_ppo(cfg, reward_fn=reward)
    rows = [r for r in read_metrics(root / "grpo") if r["kind"] == "train"]
    assert len(rows) == 2
    # train.prefix_sharing=auto: each group's 4 rows read its prompt, images included, once.
    assert all(r["prefix/tokens_saved"] > 0 for r in rows), rows
    sampled = [t for ids, _, _ in seen for row in ids for t in row]
    # The model's vision ids (image, video, vision start and end, the tokenizer's vision pad).
    vision_ids = set(load_config(base).vision.vision_token_ids)
    assert len(vision_ids) == 5 and vision_ids <= processor.reserved_ids
    assert len(sampled) >= 2 * 8 and not set(sampled) & vision_ids
    # The rows' columns reach the reward as the data holds them: the answer and the image paths.
    assert all(isinstance(a, int) for _, answers, _ in seen for a in answers)
    assert all(p[0].startswith("images/") for _, _, images in seen for p in images)


def test_a_pack_of_text_and_image_rows_split_into_text_only_pieces_trains(setup):
    """Half the prompts without an image, the update's forwards 2 rows each: a piece holding only
    text rows is a text forward (the pack's slice has no image), one holding an image row reads
    its image."""
    root, base, data, _ = setup
    rows = [json.loads(line) for line in Path(data["prompts"]).read_text().splitlines()]
    for row in rows[1::2]:  # every other prompt as text: its image part and column dropped
        del row["images"]
        row["prompt"] = [{**turn, "content": [part for part in turn["content"]
                                              if part.get("type") != "image"]}
                         if isinstance(turn.get("content"), list) else turn
                         for turn in row["prompt"]]
    mixed = Path(data["prompts"]).parent / "mixed.jsonl"  # the images: relative to it
    mixed.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = GRPOConfig(
        policy=base, prompts_file=str(mixed), output_dir=str(root / "grpo_mixed"), seed=0,
        rollout=RolloutConfig(prompts_per_iteration=4, samples_per_prompt=2, max_new_tokens=2,
                              kv_cache_memory=1 << 22, max_prompt_length=20),
        ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=8, microbatch_size=2,
                         vf_coef=0.0),
        optim=OptimConfig(lr=1e-2), reward_fn="fusedrl.engine.demos.vision_task:count_reward",
        train=LoopConfig(iterations=1, progress=False, device="cpu", resume=False))
    cfg.reward.isolation = "thread"
    train_ppo(cfg)
    assert [r["step"] for r in read_metrics(root / "grpo_mixed") if r["kind"] == "train"] == [1]


def _absolute_rows(data) -> list[dict]:
    """The demo's prompt rows with their image paths absolute (a Python list has no folder)."""
    folder = Path(data["prompts"]).parent
    rows = [json.loads(line) for line in Path(data["prompts"]).read_text().splitlines()]
    return [{**row, "images": [str(folder / p) for p in row["images"]]} for row in rows]


def test_grpo_trainer_trains_an_in_memory_vision_model_in_place(setup, tmp_path, capsys):
    """transformers' Qwen2.5-VL in memory (its parameters named model.language_model.*,
    model.visual.*; the export's the Hub's model.*, visual.*): trained and updated in place, its
    image processor read from the directory it came from; one loaded from a directory without one
    and given its tokenizer alone is refused in one line (its images could not be read)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    from fusedrl.engine import GRPOTrainer
    from fusedrl.engine.errors import UsageError
    root, base, data, _ = setup
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    args = {"output_dir": str(tmp_path / "run"), "seed": 0,
            "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 2,
                        "kv_cache_memory": 1 << 22, "max_prompt_length": 20},
            "ppo": {"minibatch_size": 4}, "optim": {"lr": 1e-2}, "reward": {"isolation": "thread"},
            "train": {"iterations": 1, "device": "cpu", "progress": False}}
    def varied(completions, completion_ids, **_):  # rewards that differ within a group
        return [float(ids[0] % 7) for ids in completion_ids]
    GRPOTrainer(model=model, reward_funcs=varied, args=args,
                train_dataset=_absolute_rows(data)).train()
    assert any(not torch.equal(before[name], t) for name, t in model.state_dict().items())
    bare = tmp_path / "bare"
    shutil.copytree(base, bare, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with pytest.raises(UsageError, match="needs its image processor to read its rows' images"):
        GRPOTrainer(model=Qwen2_5_VLForConditionalGeneration.from_pretrained(bare),
                    processing_class=AutoTokenizer.from_pretrained(bare),
                    reward_funcs=count_reward, args={**args, "output_dir": str(tmp_path / "r2")},
                    train_dataset=_absolute_rows(data)).train()
    result = run_fusedrl("grpo", f"policy={bare}", f"prompts_file={data['prompts']}",
                         f"output_dir={tmp_path / 'r3'}",
                         "reward_fn=fusedrl.engine.demos.vision_task:count_reward")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "a vision-language model (qwen2_5_vl) without its image processor" in result.stderr


def test_a_config_whose_vision_token_ids_are_not_the_tokenizers_is_refused(setup, tmp_path):
    """config.json's image_token_id naming another token than the tokenizer's <|image_pad|>: the
    model would read that token as an image slot and the sampler mask it instead; refused at the
    start, before the output directory is made."""
    root, base, data, _ = setup
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    config = json.loads((bad / "config.json").read_text())
    config["image_token_id"] = 0
    (bad / "config.json").write_text(json.dumps(config))
    result = run_fusedrl("grpo", f"policy={bad}", f"prompts_file={data['prompts']}",
                         f"output_dir={tmp_path / 'out'}",
                         "reward_fn=fusedrl.engine.demos.vision_task:count_reward")
    last = result.stderr.splitlines()[-1]
    assert result.returncode == 1 and last.startswith(f"fusedrl grpo: policy={bad}: "), last
    assert "config.json's image_token_id is 0, but its tokenizer's '<|image_pad|>' is" in last
    assert not (tmp_path / "out").exists()


def test_grpo_with_images_in_exact_mode_has_zero_log_prob_mismatch(setup):
    """rollout.exact: the sampler's log-prob of every sampled token equals the trainer's old-policy
    forward's bit for bit, the images included, in both iterations (the second after an update)."""
    root, base, data, _ = setup
    cfg = GRPOConfig(
        policy=base, prompts_file=data["prompts"], output_dir=str(root / "exact"), seed=0,
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=3,
                              temperature=0.9, kv_cache_memory=1 << 22, max_prompt_length=20,
                              exact=True),
        ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=6, vf_coef=0.0,
                         is_mode="tis"),
        optim=OptimConfig(lr=1e-2),
        train=LoopConfig(iterations=2, progress=False, device="cpu", resume=False))
    train_ppo(cfg, reward_fn=count_reward)
    rows = [r for r in read_metrics(root / "exact") if r["kind"] == "train"]
    assert len(rows) == 2
    for r in rows:
        assert (r["logprob_mismatch"], r["logprob_mismatch_max"],
                r["logprob_mismatch_tokens"]) == (0, 0, 0), r
        assert r["is_weight_mean"] == 1 and r["is_weight_max"] == 1, r


@pytest.mark.integration
def test_fusedrl_grpo_command_with_images_runs_to_the_end(setup):
    """`fusedrl grpo` on the JSONL rows (images by path) with a reward function named by module."""
    root, base, data, _ = setup
    out = root / "cli"
    result = run_fusedrl(
        "grpo", f"policy={base}", f"prompts_file={data['prompts']}", f"output_dir={out}",
        "reward_fn=fusedrl.engine.demos.vision_task:count_reward", "train.iterations=1",
        "train.device=cpu", "train.progress=false", "rollout.prompts_per_iteration=2",
        "rollout.samples_per_prompt=2", "rollout.max_new_tokens=2",
        "rollout.kv_cache_memory=4194304", "ppo.minibatch_size=4", timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "final" / "preprocessor_config.json").is_file()

"""Training a tiny Qwen2.5-VL on rows with images: packs keep each sequence's pixels with it through
select and concatenation, SFT trains the decoder with the vision tower frozen by default (or trains
the tower too), and the options a vision model does not run with are refused in one line."""
import pytest
import torch

from fusedrl.engine.config.compatibility import refuse_for_vision
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, PPOConfig, RolloutConfig
from fusedrl.engine.config.distill import DistillConfig
from fusedrl.engine.config.train import DataConfig, OptimConfig, RMConfig, SFTConfig, TrainConfig
from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.data.vision_processor import ImageInputs
from fusedrl.engine.demos.vision import build_vision_model
from fusedrl.engine.demos.vision_task import build_vision_processor, write_vision_data
from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.stages.rollout.packs import concat_packs
from fusedrl.engine.stages.sft import train_sft


def _images(patches: list[int], value: float) -> ImageInputs:
    """Images of `patches` (h * w with t = 1, h = 1) patches, every pixel `value` + the image's
    index, so that rows can be traced."""
    return ImageInputs(torch.cat([torch.full((n, 3), value + i) for i, n in enumerate(patches)]),
                       torch.tensor([[1, 1, n] for n in patches]))


def test_packs_keep_each_sequences_images():
    """select() and concat_packs() move a sequence's pixels and grids with it; text rows have
    none."""
    seqs = [([1, 2], [3], True), ([4], [5, 6], True), ([7, 8], [9], True)]
    images = [_images([4, 8], 10.0), None, _images([4], 30.0)]
    packed = pack_sequences(seqs, width=2, images=images)
    assert packed.image_counts == [2, 0, 1] and packed.pixel_values.shape == (16, 3)
    picked = packed.select([2, 1, 0])
    assert picked.image_counts == [1, 0, 2]
    assert picked.image_grid_thw.tolist() == [[1, 1, 4], [1, 1, 4], [1, 1, 8]]
    assert picked.pixel_values[:, 0].tolist() == [30.0] * 4 + [10.0] * 4 + [11.0] * 8
    text_only = packed.select([1])  # a text pack, as one that never held an image
    assert text_only.pixel_values is None and text_only.image_grid_thw is None
    assert text_only.image_counts == [0]
    rejoined = concat_packs([text_only, packed.select([2])])
    assert rejoined.image_counts == [0, 1] and rejoined.pixel_values[:, 0].tolist() == [30.0] * 4
    joined = concat_packs([pack_sequences(seqs[1:2], width=2, images=[None]),
                           pack_sequences(seqs[2:], width=1, images=images[2:])])
    assert joined.image_counts == [0, 1] and joined.pixel_values[:, 0].tolist() == [30.0] * 4
    assert pack_sequences(seqs, width=2).pixel_values is None


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision_sft")
    processor = build_vision_processor()
    data = write_vision_data(16, 2, 0.0, 0, root / "data")
    return root, build_vision_model(root / "base", 0, processor), data


def _sft(root, base, data, name, **train):
    return train_sft(SFTConfig(
        model=base, output_dir=str(root / name), seed=0,
        data=DataConfig(train_file=data["sft"], tokens_per_batch=8 * 32, max_length=32,
                        max_prompt_length=28, eval_fraction=0),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0),
        train=TrainConfig(epochs=1, eval_every=0, device="cpu", progress=False, resume=False,
                          **train)))


def _changed(before, after, prefix: str) -> bool:
    return any(not torch.equal(p, after[name]) for name, p in before.items()
               if name.startswith(prefix))


def test_sft_trains_the_decoder_and_freezes_the_tower_by_default(vision_run):
    root, base, data = vision_run
    before = dict(load_model(base).state_dict())
    frozen = dict(load_model(_sft(root, base, data, "frozen")).state_dict())
    assert _changed(before, frozen, "model.layers.") and not _changed(before, frozen, "visual.")
    trained = dict(load_model(_sft(root, base, data, "trained", train_vision=True)).state_dict())
    assert _changed(before, trained, "visual.")


def _grpo(root, **options):
    rollout = options.pop("rollout", {})
    options.setdefault("train", LoopConfig(device="cpu"))
    return GRPOConfig(policy=str(root), prompts_file=str(root / "p.jsonl"),
                      output_dir=str(root / "out"),
                      rollout=RolloutConfig(samples_per_prompt=2, **rollout), **options)


@pytest.mark.parametrize("options,named", [
    ({"rollout": {"tools": ["m:f"]}}, "rollout.tools="),
    ({"lora": LoRAConfig(rank=2), "train": LoopConfig(device="cpu", train_vision=True)},
     "train.train_vision=true with lora.rank=2"),
    ({"train": LoopConfig(device="cpu", tensor_parallel=2), "reward_model": "rm"},
     r"train.tensor_parallel=2 with a vision-language model and a reward model scoring "
     r"\(reward_model\): not shown yet"),
])
def test_what_a_vision_model_does_not_run_with_is_refused(tmp_path, options, named):
    with pytest.raises(ConfigValueError, match=named.replace("[", "\\[")):
        refuse_for_vision(_grpo(tmp_path, **options))
    refuse_for_vision(_grpo(tmp_path))  # GRPO with reward functions runs
    refuse_for_vision(_grpo(tmp_path, train=LoopConfig(device="cpu", tensor_parallel=2)))
    with pytest.raises(ConfigValueError, match=r"^train.tensor_parallel=2 with a vision-language "
                                               r"model and a critic \(critic\)"):
        refuse_for_vision(PPOConfig(policy=str(tmp_path), prompts_file="p.jsonl",
                                    output_dir=str(tmp_path / "o"), reward_fn=["m:f"],
                                    train=LoopConfig(device="cpu", tensor_parallel=2)))
    with pytest.raises(ConfigValueError, match=r"^train.tensor_parallel=2 with a vision-language "
                                               r"model and distillation \(teacher\)"):
        refuse_for_vision(DistillConfig(policy=str(tmp_path), teacher=str(tmp_path),
                                        prompts_file="p.jsonl", output_dir=str(tmp_path / "d"),
                                        train=LoopConfig(device="cpu", tensor_parallel=2)))
    with pytest.raises(ConfigValueError, match=r"^train.tensor_parallel=2 with a vision-language "
                                               r"model and the reward-model stage \(beta_rm\)"):
        refuse_for_vision(RMConfig(model=str(tmp_path), output_dir=str(tmp_path / "r"),
                                   data=DataConfig(train_file="p.jsonl", format="pairwise"),
                                   train=TrainConfig(device="cpu", tensor_parallel=2)))
    for critic in ("separate", "shared"):  # and PPO with a critic (tests/engine/stages/ppo/)
        refuse_for_vision(PPOConfig(policy=str(tmp_path), prompts_file="p.jsonl", critic=critic,
                                    output_dir=str(tmp_path / "o"), reward_fn=["m:f"]))


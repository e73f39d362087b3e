"""PPO with a critic on rows with images: the separate critic (a value model built from a tiny
Qwen2.5-VL policy's checkpoint, or from a vision-language reward model) and the shared value head
see each sample's images, the pixels of the rollout's pack the policy's forward takes,
and their values move with the image alone; a vision-language reward model scores the rollout
with its images (a text one beside a vision policy is refused)."""
import pytest
import torch

from fusedrl.engine.config.ppo import LoopConfig, PPOConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.data.prompts import load_prompts
from fusedrl.engine.demos.vision_task import count_reward
from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.model.reward_model import load_or_start_reward_model, save_reward_model
from fusedrl.engine.model.value_model import ValueModel, load_value_model
from fusedrl.engine.model.vision_language import VisionLanguageModel
from fusedrl.engine.stages.ppo import trainer
from fusedrl.engine.train.runlog import read_metrics
from train_testing import save_tiny_model
from vision_testing import vision_demo_run


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo_vision")
    return (root, *vision_demo_run(root))


def ppo_config(root, base, data, name, critic, **options):
    return PPOConfig(
        policy=base, prompts_file=data["prompts"], output_dir=str(root / name), seed=0,
        critic=critic, **options,
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=3,
                              kv_cache_memory=1 << 22, max_prompt_length=20),
        ppo=UpdateConfig(epochs=1, minibatch_size=4),
        optim=OptimConfig(lr=1e-2),
        train=LoopConfig(iterations=2, progress=False, device="cpu", resume=False))


def watch_towers(monkeypatch) -> dict:
    """Record the pixel_values tensor of every call of the policy's, the critic's and the reward
    model's vision towers, in call order, as (role, tensor)."""
    calls = []
    build = trainer.build_models

    def build_and_watch(*args, **kwargs):
        models = build(*args, **kwargs)
        scorer = getattr(models.score, "rm", None)
        for role, model in (("policy", models.policy), ("critic", models.critic),
                            ("reward model", scorer)):
            if model is not None:
                model.visual.register_forward_pre_hook(
                    lambda _, inputs, role=role: calls.append((role, inputs[0])))
        return models

    monkeypatch.setattr(trainer, "build_models", build_and_watch)
    return calls


def prompt_pixels(data, processor) -> list[torch.Tensor]:
    """Each prompt row's pixel_values as the data reader processes them (one image a row)."""
    rows, _ = load_prompts(data["prompts"], processor, 20, 64)
    return [row.images.pixel_values for row in rows]


def test_ppo_separate_critic_with_images_takes_the_rollouts_pixels(setup, monkeypatch):
    root, base, data, processor = setup
    calls = watch_towers(monkeypatch)
    trainer.train_ppo(ppo_config(root, base, data, "separate", "separate"),
                      reward_fn=count_reward)
    rows = [r for r in read_metrics(root / "separate") if r["kind"] == "train"]
    assert len(rows) == 2
    for r in rows:
        for key in ("policy_loss", "value_loss", "loss", "grad_norm"):
            assert torch.isfinite(torch.tensor(r[key])), (key, r)
    critic_calls = [i for i, (role, _) in enumerate(calls) if role == "critic"]
    # the old values of both iterations and the update's minibatches: each after the policy's
    # forward over the same micro-batch, whose pixels it reads (the pack's, no second packing;
    # each prompt group's images once where the rows share their prompt)
    assert len(critic_calls) >= 4
    for i in critic_calls:
        assert calls[i - 1][0] == "policy" and torch.equal(calls[i][1], calls[i - 1][1])
    # and those pixels are the data reader's, each row's image processed once (all of one size)
    known = prompt_pixels(data, processor)
    for i in critic_calls:
        for chunk in calls[i][1].split(known[0].shape[0]):
            assert any(torch.equal(chunk, p) for p in known)
    critic = load_value_model(root / "separate" / "final_critic")
    assert isinstance(critic, ValueModel) and isinstance(critic, VisionLanguageModel)


def test_critic_values_move_with_the_image_alone(setup):
    """A critic built from the policy's checkpoint (as PPO's separate critic without a reward
    model, its value head then drawn at random): its values over one prompt and answer with two
    different pictures differ; with the same picture twice they agree."""
    root, base, data, processor = setup
    critic = load_value_model(base, start="lm").eval()
    assert isinstance(critic, VisionLanguageModel)
    torch.manual_seed(0)
    with torch.no_grad():
        critic.value_head.weight.normal_()
    rows, _ = load_prompts(data["prompts"], processor, 20, 64)
    first, second = rows[0], next(r for r in rows[1:] if not torch.equal(
        r.images.pixel_values, rows[0].images.pixel_values))
    assert first.ids == second.ids  # the same question, another picture
    response = processor.tokenizer.encode("3", add_special_tokens=False)
    values = []
    for images in ([first.images, first.images], [first.images, second.images]):
        packed = pack_sequences([(first.ids, response, True)] * 2, width=len(response),
                                images=images)
        with torch.no_grad():
            values.append(critic.response_values(packed))
    same, other = values
    assert torch.allclose(same[0], same[1], atol=1e-5)  # a pack's rows round alike, not bitwise
    assert (other[0] - other[1]).abs().max() > 1e-2


def test_ppo_shared_value_head_with_images_runs_to_the_end(setup):
    root, base, data, _ = setup
    trainer.train_ppo(ppo_config(root, base, data, "shared", "shared"), reward_fn=count_reward)
    rows = [r for r in read_metrics(root / "shared") if r["kind"] == "train"]
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor([r["value_loss"], r["policy_loss"]])).all()
               for r in rows)


def vision_reward_model(base, out) -> str:
    """A reward model directory started from the vision policy's checkpoint, its score head drawn
    at random (what `fusedrl rm` would export, untrained)."""
    rm = load_or_start_reward_model(base)
    torch.manual_seed(1)
    with torch.no_grad():
        rm.score.weight.normal_()
    save_reward_model(rm, out, source_dir=base)
    return str(out)


def test_ppo_scored_by_a_vision_reward_model_with_its_critic(setup, monkeypatch):
    """reward_model: a vision-language reward model scores each rollout row with the row's own
    processed pixels, and the separate critic starts from it (its score head as the value head)."""
    root, base, data, processor = setup
    rm_dir = vision_reward_model(base, root / "rm")
    calls = watch_towers(monkeypatch)
    trainer.train_ppo(ppo_config(root, base, data, "with_rm", "separate", reward_model=rm_dir))
    rows = [r for r in read_metrics(root / "with_rm") if r["kind"] == "train"]
    assert len(rows) == 2
    assert all(torch.isfinite(torch.tensor([r["score_std"], r["value_loss"]])).all()
               for r in rows)
    assert all(r["score_std"] > 0 for r in rows)  # the random head tells the rows apart
    known = prompt_pixels(data, processor)
    scored = [pixels for role, pixels in calls if role == "reward model"]
    assert len(scored) >= 2
    for pixels in scored:
        for chunk in pixels.split(known[0].shape[0]):
            assert any(torch.equal(chunk, p) for p in known)
    for i in [i for i, (role, _) in enumerate(calls) if role == "critic"]:
        assert calls[i - 1][0] == "policy" and torch.equal(calls[i][1], calls[i - 1][1])


def test_a_text_reward_model_beside_a_vision_policy_is_refused(setup, tmp_path):
    root, base, data, _ = setup
    text_rm = save_tiny_model(tmp_path / "text_rm", "qwen2")
    with pytest.raises(ConfigValueError, match="is a text model but the policy is a "
                                               "vision-language model"):
        trainer.train_ppo(ppo_config(root, base, data, "refused", "separate",
                                     reward_model=str(text_rm)))

"""The on-policy distillation stage on tiny models: the student's divergence to a wider teacher falls
while the teacher stays bitwise unchanged, in each mode; runs resume bit-exactly (full weights and
LoRA, with GKD's dataset completions mixed in); a teacher of another vocabulary is refused in one
line; `fusedrl distill --help` names the teacher; `fusedrl plan distill` counts the teacher."""
import json
import shutil

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from fusedrl.engine import cli
from fusedrl.engine.config.distill import DistillConfig, DistillSection
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.ppo import LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.stages.distill.teacher import load_teacher, score_with_teacher
from fusedrl.engine.stages.distill.trainer import train_distill
from fusedrl.engine.stages.distill.update import DistillBatch, DistillSettings, distill_update
from fusedrl.engine.stages.rollout.phase_timer import PhaseTimer
from fusedrl.engine.stages.rollout.answer_rows import sample_and_score
from fusedrl.engine.stages.rollout.build import build_models, build_optimizers
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.kernels import use_backend
from agent_testing import save_chat_model
from engine_testing import random_prompts
from train_testing import copy_checkpoint, save_tiny_model, write_jsonl

PROMPTS = ["the quick brown", "hello world", "lazy dog", "fox jumps"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A student (hidden 64) and a wider teacher (hidden 96) of the test vocabulary, a teacher of
    another vocabulary, and prompts with TRL's prompt-completion columns."""
    root = tmp_path_factory.mktemp("distill")
    student = save_tiny_model(root / "student")
    teacher = save_tiny_model(root / "teacher", seed=1, hidden_size=96, intermediate_size=160)
    other = save_tiny_model(root / "other", seed=2, vocab_size=320)
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p, "completion": " over the dog"}
                                                   for p in PROMPTS])
    return root, student, teacher, other, prompts


@pytest.fixture(autouse=True)
def torch_kernels():
    """On torch's kernels, as the PPO stage's tests run (the fused ones are tests/kernels')."""
    with use_backend("torch"):
        yield


def config(setup, name, **fields):
    root, student, teacher, _, prompts = setup
    defaults = dict(
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=2, max_new_tokens=6,
                              kv_cache_memory=1 << 22),
        ppo=UpdateConfig(estimator="grpo", kl_loss_coef=0.0, vf_coef=0.0, epochs=1,
                         minibatch_size=4),
        train=LoopConfig(iterations=2, progress=False, device="cpu"))
    return DistillConfig(policy=str(student), teacher=str(teacher), prompts_file=str(prompts),
                         output_dir=str(root / name), **{**defaults, **fields})


@pytest.mark.parametrize("mode", ["full", "top_k", "sampled"])
def test_the_divergence_falls_and_the_teacher_stays_frozen(setup, mode):
    """Six updates on one fixed batch of the student's samples: the divergence falls, the
    teacher's weights are bitwise what they were and never get a gradient."""
    cfg = config(setup, f"unit-{mode}", distill=DistillSection(mode=mode, top_k=8),
                 ppo=UpdateConfig(estimator="grpo", kl_loss_coef=0.0, vf_coef=0.0, epochs=1,
                                  minibatch_size=2, microbatch_size=1))
    cfg.optim.lr = 3e-3
    device = torch.device("cpu")
    models = build_models(cfg, device, torch.float32, AutoTokenizer.from_pretrained(cfg.policy),
                          None, with_reference=False)
    teacher = load_teacher(cfg.teacher, torch.float32, device,
                           ParallelDims.from_train(cfg.train, 1, "cpu"))
    assert models.reference is None and teacher.model.config.hidden_size == 96
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    opts, _ = build_optimizers(models, cfg)
    samples = sample_and_score(models, random_prompts([4, 6], seed=0), cfg.rollout, 0,
                               PhaseTimer(device))
    top_k = 8 if mode == "top_k" else None
    scores = score_with_teacher(teacher, samples.packed, 1.0, None, top_k)
    batch = DistillBatch(samples.packed, scores,
                         samples.sampler_logprobs.view(-1)[samples.packed.grid_index])
    divergences = [distill_update(models, teacher, opts, batch, DistillSettings.of(cfg), seed=i)
                   ["divergence"] for i in range(6)]
    assert all(torch.isfinite(torch.tensor(divergences)))
    if mode != "sampled":  # the sampled mode's estimate is of the sampler's old tokens
        assert divergences[-1] < 0.8 * divergences[0], divergences
    assert all(torch.equal(v, teacher.model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_resumes_bit_exactly(setup, lora):
    """Two iterations straight == one, a checkpoint, a fresh resume, one more; GKD's mixing
    (lmbda 0.5) puts a dataset iteration and a sampled one in the two; metrics are logged."""
    root = setup[0]
    extra = dict(lora=LoRAConfig(rank=4, alpha=8.0)) if lora else {}
    loop = dict(iterations=2, save_every=1, keep_checkpoints=0, progress=False, device="cpu")

    def make(run):
        return config(setup, run, distill=DistillSection(beta=0.5, lmbda=0.5),
                      train=LoopConfig(resume=True, **loop), **extra)
    name = "lora" if lora else "full"
    train_distill(make(f"straight-{name}"))
    copy_checkpoint(root / f"straight-{name}", 1, root / f"resumed-{name}")
    train_distill(make(f"resumed-{name}"))
    a, b = [load_model(root / f"{kind}-{name}" / "final").state_dict()
            for kind in ("straight", "resumed")]
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [r for r in read_metrics(str(root / f"straight-{name}")) if r["kind"] == "train"]
    assert {r["on_policy"] for r in rows} == {True, False}  # seed 0: one of each
    for key in ("divergence", "entropy", "teacher_logprob"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert not any("score_mean" in r for r in rows)   # no reward (distill.reward_coef 0)


def test_multi_turn_trajectories_distill_the_model_tokens_only(tmp_path):
    """Trajectories of three turns with an environment (observations longer than the answers):
    the teacher scores and the student learns on the model's sampled tokens alone."""
    student = save_chat_model(tmp_path / "student")
    teacher = save_chat_model(tmp_path / "teacher", seed=1, hidden_size=96, intermediate_size=160)
    cfg = DistillConfig.from_dict({
        "policy": str(student), "teacher": str(teacher), "output_dir": str(tmp_path / "run"),
        "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 6,
                    "kv_cache_memory": 1 << 22, "max_prompt_length": 40,
                    "environment": "agent_envs:ThreeTurns", "max_turns": 3},
        "ppo": {"minibatch_size": 4},
        "train": {"iterations": 1, "progress": False, "device": "cpu"}})
    train_distill(cfg, dataset=datasets.Dataset.from_list(
        [{"prompt": "hello world"}, {"prompt": "the brown dog"}]))
    [row] = [r for r in read_metrics(str(tmp_path / "run")) if r["kind"] == "train"]
    assert row["tokens/environment"] > row["tokens/model"] > 0
    assert row["tokens"] == row["tokens/model"]  # the divergence's tokens: the model's alone
    assert row["turns/mean"] >= 2.5 and row["divergence"] > 0


def test_partial_rollouts_distill_the_groups_they_complete(setup):
    """Answers carried across iterations under a token budget: an iteration that completes no
    group trains nothing, the others distill the complete groups (the divergence nonzero)."""
    rollout = RolloutConfig(prompts_per_iteration=1, samples_per_prompt=2, max_new_tokens=6,
                            kv_cache_memory=1 << 22, partial_rollouts=True,
                            tokens_per_iteration=8)
    train_distill(config(setup, "partial", rollout=rollout,
                         train=LoopConfig(iterations=3, progress=False, device="cpu")))
    rows = [r for r in read_metrics(str(setup[0] / "partial")) if r["kind"] == "train"]
    assert rows[0]["carried"] > 0 and rows[0]["groups_trained"] == 0
    trained = [r for r in rows if r["groups_trained"]]
    assert trained and all(r["divergence"] > 0 and r["grad_norm"] > 0 and r["tokens"] > 0
                           for r in trained)


def test_a_teacher_of_another_vocabulary_is_refused(setup, tmp_path):
    """Another vocab_size, or the same size with tokens at other ids: refused in one line before
    the output directory is claimed."""
    root, student, teacher, other, _ = setup
    cfg = config(setup, "mismatch")
    cfg.teacher = str(other)
    with pytest.raises(UsageError, match=r"^teacher=.*320 tokens, the student's \(policy\) 300; "
                                         r"distillation needs one vocabulary$"):
        train_distill(cfg)
    assert not (root / "mismatch" / ".fusedrl-run").exists()
    shuffled = tmp_path / "shuffled"
    shutil.copytree(teacher, shuffled)
    tokenizer = json.loads((shuffled / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["the"], vocab["Ġdog"] = vocab["Ġdog"], vocab["the"]
    (shuffled / "tokenizer.json").write_text(json.dumps(tokenizer))
    cfg.teacher = str(shuffled)
    with pytest.raises(UsageError, match=r"^teacher=.*: its tokenizer gives 2 token\(s\) another id"):
        train_distill(cfg)
    cfg = config(setup, "top-k", distill=DistillSection(mode="top_k", top_k=300))
    with pytest.raises(UsageError, match=r"^distill.top_k=300 must be below the vocabulary's 300"):
        train_distill(cfg)


@pytest.mark.parametrize("fields, message", [
    (dict(distill=DistillSection(mode="sampled", temperature=0.7)),
     r"distill.temperature \(0.7\) must equal rollout.temperature"),
    (dict(distill=DistillSection(mode="sampled", lmbda=0.5)), r"distill.lmbda must be 1"),
    (dict(reward_fn="reward_testing:vowel_fraction"),
     r"reward_fn='reward_testing:vowel_fraction' would be ignored: .* distill.reward_coef=0"),
    (dict(train=LoopConfig(context_parallel=2)),
     r"train.context_parallel=2 with teacher=.*: not supported \(distillation runs"),
    (dict(ppo=UpdateConfig(estimator="grpo", vf_coef=0.0, kl_loss_coef=0.01)),
     r"ppo.kl_loss_coef and reward.kl_coef must be 0"),
])
def test_options_that_cannot_run_are_refused_in_one_line(setup, fields, message):
    with pytest.raises(ValueError, match=message):
        config(setup, "refused", **fields)
    for bad, name in ((dict(beta=1.5), "beta"), (dict(lmbda=-0.1), "lmbda"),
                      (dict(top_k=0), "top_k"), (dict(temperature=0.0), "temperature")):
        with pytest.raises(ValueError, match=f"distill.{name} must be"):
            DistillSection(**bad)


def test_help_names_the_teacher(capsys):
    with pytest.raises(SystemExit):
        cli.main(["distill", "--help"])
    out = capsys.readouterr().out
    assert "teacher=DIR" in out and "\n  teacher (str" in out and "distill.beta" in out


def test_plan_counts_the_teacher(setup, capsys):
    """The teacher stands where the reference would; on 2 GPUs its head gathered whole (bf16) is
    held from the first rollout on."""
    _, student, teacher, _, _ = setup
    assert cli.main(["plan", "distill", f"policy={student}", f"teacher={teacher}", "--json"]) == 0
    roles = [m["role"] for m in json.loads(capsys.readouterr().out)["models"]]
    assert roles == ["policy", "teacher"]
    assert cli.main(["plan", "distill", f"policy={student}", f"teacher={teacher}", "--gpus", "2",
                     "--json"]) == 0
    phases = json.loads(capsys.readouterr().out)["phases"]
    assert phases["rollout"]["weights"] - phases["load"]["weights"] == 300 * 96 * 2  # V x Ht bf16

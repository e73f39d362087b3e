"""The PPO stage on tiny models: rollout packing, the hybrid actor, update direction, NaN guard,
KL ceiling, resume equivalence, critics, config errors."""
import contextlib
import dataclasses

import pytest
import torch

from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.value_model import value_model_from_reward_model
from fusedrl.engine.stages.rollout.prompt_stream import prompt_indices
from fusedrl.engine.stages.ppo.trainer import KLCeilingExceeded, train_ppo
from fusedrl.engine.stages.rollout.build import build_models, build_optimizers
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, PPOConfig, RewardConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.stages.ppo.advantages import RunningMoments
from fusedrl.engine.stages.rollout.answer_rows import sample_and_score
from fusedrl.engine.stages.rollout.phase_timer import PhaseTimer
from fusedrl.engine.stages.ppo.update import UpdateSettings, minibatch_backward, ppo_update
from fusedrl.engine.stages.rollout.microbatches import microbatch_rows
from fusedrl.engine.model.reward_model import reward_model_from_lm, save_reward_model
from fusedrl.engine.stages.ppo.experience import ExperienceSettings, make_rollout
from fusedrl.engine.stages.rollout.packs import pack_rollout
from fusedrl.engine.stages.ppo.forwards import policy_forward, response_logprobs
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.kernels import use_backend
from engine_testing import VOCAB, random_prompts, rewards_in_thread, sample_responses
from reward_testing import vowel_fraction
from train_testing import checkpoint_data, copy_checkpoint, save_tiny_model, write_jsonl

LOW_IDS = VOCAB // 2


def low_id_fraction(prompts, responses, rows=None):
    """Toy scorer on token ids: the fraction of response tokens below VOCAB / 2."""
    return torch.tensor([sum(t < LOW_IDS for t in r) / len(r) for r in responses])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    policy_dir = save_tiny_model(root / "policy")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in
                                                   ["the quick brown", "hello world", "lazy dog", "fox jumps"]])
    return root, policy_dir, prompts


@pytest.fixture(autouse=True)
def torch_kernels():
    """Every run here is on the CPU: its ops on torch's kernels, as on a machine without the Triton
    interpreter. The stage's wiring is under test; the fused kernels are tests/kernels' (and a PPO
    update's on them, test_forwards.py's)."""
    with use_backend("torch"):
        yield


def config(root, policy_dir, prompts, name, **fields):
    defaults = dict(
        rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6, kv_cache_memory=1 << 22),
        ppo=UpdateConfig(epochs=2, minibatch_size=4),
        train=LoopConfig(iterations=2, progress=False, resume=True, device="cpu"),
        reward_fn="reward_testing:vowel_fraction", critic="shared")
    return PPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / name),
                     **{**defaults, **fields})


def rollout_of(models, prompts, cfg, kl_coef, seed=0, sampler_backend=None):
    """Sample, score and build the rollout of `prompts`, as one iteration does; `sampler_backend`:
    the kernels the sampling runs on (use_backend), when they are not the scoring forwards'."""
    timer = PhaseTimer(torch.device("cpu"))
    with use_backend(sampler_backend) if sampler_backend else contextlib.nullcontext():
        samples = sample_and_score(models, prompts, cfg.rollout, seed, timer,
                                   share_prompts=cfg.train.shares_prefixes)
    experience = make_rollout(models, samples, ExperienceSettings.of(cfg), kl_coef, RunningMoments(), timer)
    return experience.rollout, experience.metrics


def test_pack_rollout_positions():
    packed = pack_rollout([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], "cpu")
    assert packed.input_ids.tolist() == [1, 2, 3, 7, 8, 4, 9, 10, 11] and packed.seqlens == [5, 4]
    # Row 0: tokens 7, 8 at positions 3, 4 are predicted from positions 2, 3; row 1 starts at 5.
    assert packed.target_rows.tolist() == [2, 3, 5, 6, 7]
    assert packed.target_ids.tolist() == [7, 8, 9, 10, 11]
    assert packed.grid_mask().tolist() == [[True, True, False], [True, True, True]]
    assert packed.to_grid(torch.arange(5.0)).tolist() == [[0, 1, 0], [2, 3, 4]]
    with pytest.raises(ValueError, match="row 1 has 0 prompt"):
        pack_rollout([[1], []], [[2], [3]], "cpu")


def test_response_logprobs_match_transformers(model_dirs):
    path, hf = model_dirs["qwen2"]
    model = load_model(path)
    prompts, responses = random_prompts([3, 5], seed=1), random_prompts([4, 2], seed=2)
    packed = pack_rollout(prompts, responses, "cpu")
    logp, entropy, _ = response_logprobs(model, packed, temperature=0.7, with_entropy=True)
    for r, (p, y) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = hf(torch.tensor([p + y])).logits[0].double() / 0.7
        logsm = logits.log_softmax(-1)[len(p) - 1:len(p) - 1 + len(y)]
        expected = logsm.gather(-1, torch.tensor(y)[:, None])[:, 0]
        torch.testing.assert_close(logp[r, :len(y)].double(), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(entropy[r, :len(y)].double(), -(logsm.exp() * logsm).sum(-1), atol=1e-4, rtol=1e-4)
        assert torch.all(logp[r, len(y):] == 0)


def test_prompt_order_is_a_resumable_stream():
    seen = [prompt_indices(5, 3, seed=7, start=3 * i) for i in range(5)]
    flat = sum(seen, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert prompt_indices(5, 3, seed=7, start=9) == seen[3]
    assert prompt_indices(5, 4, seed=7, start=2) == flat[2:6]   # any count from any position


def test_hybrid_actor_generates_from_the_trained_weights(setup):
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "actor", critic="shared")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    models = build_models(cfg, torch.device("cpu"), torch.float32, tokenizer,
                          rewards_in_thread(vowel_fraction))
    assert models.actor.llm.model is models.policy                     # one weight copy
    pool = models.actor.kv_pool_bytes
    opts, _ = build_optimizers(models, cfg)
    rollout, metrics = rollout_of(models, random_prompts([4, 6]), cfg, 0.05)
    # The sampler's log-probs are the training forward's, from the same weights (fp32 on CPU).
    assert metrics["logprob_mismatch_max"] < 1e-4
    ppo_update(models, opts, rollout, UpdateSettings.of(cfg), seed=0)
    rollout2, metrics2 = rollout_of(models, random_prompts([4, 6]), cfg, 0.05)
    assert metrics2["logprob_mismatch_max"] < 1e-4                      # generation saw the update
    assert not torch.allclose(rollout2.old_logprobs, rollout.old_logprobs)
    assert models.actor.kv_pool_bytes == pool                            # the pool stayed as budgeted


def test_a_released_kv_pool_comes_back_for_the_next_rollout(setup):
    """rollout.release_kv_pool (no CUDA graph on the CPU): the pool is freed after each rollout and
    allocated again by the next, which samples what a kept pool samples, bit for bit."""
    from fusedrl.engine.inference.sampling_params import SamplingParams
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "release",
                 rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                       kv_cache_memory=1 << 22, release_kv_pool=True))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    models = build_models(cfg, torch.device("cpu"), torch.float32, tokenizer,
                          rewards_in_thread(vowel_fraction))
    actor, params = models.actor, SamplingParams(n=3, max_new_tokens=6, seed=5)
    pool = actor.kv_pool_bytes
    runs = [sample_responses(actor, random_prompts([4, 6]), params) for _ in range(2)]
    assert actor.llm.runner.kv_pool is None and actor.kv_pool_bytes == pool      # freed, budget unchanged
    actor.release_kv_pool = False
    runs.append(sample_responses(actor, random_prompts([4, 6]), params))
    assert actor.llm.runner.kv_pool is not None
    for responses, logprobs in runs[1:]:
        assert responses == runs[0][0] and torch.equal(logprobs, runs[0][1])


def test_ppo_update_moves_the_policy_toward_the_reward(setup):
    """After one update, tokens with positive advantage gained log-probability and the rest lost it."""
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "direction", ppo=UpdateConfig(epochs=1, minibatch_size=100),
                 optim=dict_optim(lr=1e-4), reward=RewardConfig(kl_coef=0.0))
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    models = build_models(cfg, torch.device("cpu"), torch.float32, tokenizer,
                          rewards_in_thread(vowel_fraction))
    models.score = low_id_fraction
    opts, _ = build_optimizers(models, cfg)
    rollout, _ = rollout_of(models, random_prompts([5, 3, 7, 4], seed=10), cfg, 0.0)
    assert ppo_update(models, opts, rollout, UpdateSettings.of(cfg), seed=0).updates == 1
    with torch.no_grad():
        new_logp, _, _ = policy_forward(models, rollout.packed, cfg.rollout.temperature, with_entropy=False)
    change = (new_logp - rollout.old_logprobs)[rollout.mask]
    advantage = rollout.advantages[rollout.mask]
    assert (change * advantage).sum() > 0
    assert torch.corrcoef(torch.stack([change, advantage]))[0, 1] > 0.5


@pytest.fixture(scope="module")
def micro_rollout(setup):
    """(models with a separate critic, a rollout) that every microbatch test reads: the rollout does not
    depend on the update's options. Uneven lengths, a row without valid tokens, and a sampler that
    disagrees with the training forward, so the IS corrections have work to do."""
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "micro", critic="separate")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    models = build_models(cfg, torch.device("cpu"), torch.float32, tokenizer,
                          rewards_in_thread(vowel_fraction))
    models.score = low_id_fraction
    with use_backend("torch"):  # as torch_kernels: a module fixture starts before it
        rollout, _ = rollout_of(models, random_prompts([4, 6]), cfg, 0.05)
    rollout.mask[2] = False                          # no valid token
    rollout.mask[0, 2:] = False                      # uneven lengths: tokens and sequences weigh apart
    rollout.mask[4, 4:] = False
    noise = torch.randn(rollout.sampler_logprobs.shape, generator=torch.Generator().manual_seed(0))
    rollout.sampler_logprobs = rollout.sampler_logprobs + 0.2 * noise
    return cfg, models, rollout


@pytest.mark.parametrize("agg, options", [
    ("token-mean", {}), ("seq-mean-token-mean", {}), ("seq-mean-token-sum", {}), ("token-sum", {}),
    ("seq-mean-token-sum-norm", {}), ("token-mean", {"is_mode": "mis", "is_low": 0.9, "is_high": 1.1}),
    ("seq-mean-token-mean", {"ratio_level": "sequence", "is_mode": "tis", "is_level": "sequence"})])
def test_microbatches_accumulate_the_minibatch_gradient(micro_rollout, agg, options):
    """Micro-batches of 1 and of 4 (uneven) rows, and of token budgets, give the gradient of the whole minibatch, with an
    entropy bonus, a separate critic, uneven lengths and a row without valid tokens, for every
    aggregation, GSPO's ratio and the IS corrections (mis drops tokens from the counts)."""
    base, models, rollout = micro_rollout
    cfg = dataclasses.replace(base, ppo=UpdateConfig(epochs=1, minibatch_size=6, agg=agg, ent_coef=0.05,
                                                     vf_coef=0.5, **options))
    params = list(models.policy.parameters()) + list(models.critic.parameters())

    def gradient(microbatch_size=None, tokens_per_microbatch=None):
        for p in params:
            p.grad = None
        micro_cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_prompt_length=6),
                                        ppo=dataclasses.replace(cfg.ppo, microbatch_size=microbatch_size,
                                                                tokens_per_microbatch=tokens_per_microbatch))
        stats = minibatch_backward(models, rollout, UpdateSettings.of(micro_cfg), None)
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]), stats

    whole, whole_stats = gradient()
    assert whole.abs().max() > 0
    seqlens = rollout.packed.seqlens
    # Token budgets: one row of the longest kind (6 prompt + 6 response tokens), and about a third of
    # the rows' tokens (uneven groups).
    budgets = (12, sum(seqlens) // 3)
    assert max(seqlens) <= 12 and all(len(microbatch_rows(seqlens, None, b)) >= 3 for b in budgets)
    for split in [{"microbatch_size": 1}, {"microbatch_size": 4}] + [{"tokens_per_microbatch": b} for b in budgets]:
        grad, stats = gradient(**split)
        # fp32 sums in another order: the tolerance follows the gradient's scale.
        torch.testing.assert_close(grad, whole, rtol=1e-4, atol=1e-5 * float(whole.abs().max()))
        torch.testing.assert_close(stats["policy_loss"], whole_stats["policy_loss"], rtol=1e-4, atol=1e-6)


def test_microbatch_rows_by_rows_and_by_token_budget():
    assert microbatch_rows([5, 3, 4, 2, 6], 2, None) == [[0, 1], [2, 3], [4]]
    assert microbatch_rows([5, 3, 4, 2, 6], None, None) == [[0, 1, 2, 3, 4]]
    # greedy up to 8 tokens: 5 + 3 | 4 + 2 | 6
    assert microbatch_rows([5, 3, 4, 2, 6], None, 8) == [[0, 1], [2, 3], [4]]
    assert microbatch_rows([8, 1, 7, 1], None, 8) == [[0], [1, 2], [3]]
    with pytest.raises(ValueError, match=r"tokens_per_microbatch=100 must hold one row: .* = 264 tokens"):
        PPOConfig(policy="p", prompts_file="f", output_dir="o", reward_fn="m:f",
                  rollout=RolloutConfig(max_prompt_length=200, max_new_tokens=64),
                  ppo=UpdateConfig(tokens_per_microbatch=100))
    with pytest.raises(ValueError, match="set one of them"):
        UpdateConfig(microbatch_size=2, tokens_per_microbatch=64)
    with pytest.raises(ValueError, match="tokens_per_microbatch must be >= 1"):
        UpdateConfig(tokens_per_microbatch=0)


def dict_optim(**kw):
    from fusedrl.engine.config.train import OptimConfig
    return OptimConfig(**kw)


def test_non_finite_loss_skips_the_update(setup):
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "nan")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    models = build_models(cfg, torch.device("cpu"), torch.float32, tokenizer,
                          rewards_in_thread(vowel_fraction))
    opts, _ = build_optimizers(models, cfg)
    before = {k: v.clone() for k, v in models.policy.state_dict().items()}
    rollout, _ = rollout_of(models, random_prompts([4, 6]), cfg, 0.05)
    rollout.advantages.fill_(float("nan"))  # NaN scores are dropped before this point: poison the loss itself
    metrics = ppo_update(models, opts, rollout, UpdateSettings.of(cfg), seed=0).metrics()
    assert metrics["updates"] == 0 and metrics["skipped_updates"] == 4      # 2 epochs x 2 minibatches
    assert all(torch.equal(before[k], v) for k, v in models.policy.state_dict().items())


def test_kl_ceiling_stops_the_run(setup):
    root, policy_dir, prompts = setup
    cfg = config(root, policy_dir, prompts, "ceiling", optim=dict_optim(lr=5e-2),
                 reward=RewardConfig(kl_ceiling=1e-6), train=LoopConfig(iterations=3, progress=False, device="cpu"))
    with pytest.raises(KLCeilingExceeded, match="exceeds reward.kl_ceiling"):
        train_ppo(cfg)


def run_straight_and_resumed(root, make_config, name):
    """Two iterations straight, and one + checkpoint + a fresh resume + one; returns both finals."""
    train_ppo(make_config(f"straight-{name}"))
    copy_checkpoint(root / f"straight-{name}", 1, root / f"resumed-{name}")
    train_ppo(make_config(f"resumed-{name}"))
    return [load_model(root / f"{kind}-{name}" / "final").state_dict() for kind in ("straight", "resumed")]


@pytest.mark.parametrize("critic, precision", [("shared", "fp32"), ("separate", "fp32"), ("separate", "bf16-mixed")])
def test_resume_equivalence(setup, critic, precision):
    """Two iterations straight == one, checkpoint, a fresh process resumes, one more. In bf16-mixed
    the weights are bf16 and the checkpoint's optimizers hold fp32 masters, which resume restores."""
    root, policy_dir, prompts = setup
    loop = dict(iterations=2, save_every=1, keep_checkpoints=0, progress=False, device="cpu", precision=precision)
    name = f"{critic}-{precision}"
    a, b = run_straight_and_resumed(
        root, lambda run: config(root, policy_dir, prompts, run, critic=critic, train=LoopConfig(**loop)), name)
    assert all(torch.equal(a[k], b[k]) for k in a)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    assert {t.dtype for t in a.values()} == {dtype}
    saved = checkpoint_data(root / f"straight-{name}" / "checkpoints" / "step-00000002")
    policy_state = saved["optimizers"][0]["tensor_state"]  # {parameter: its state tensors' names}

    def dtype(param, key):
        return saved["tensors"][f"optimizers.0.{param}.{key}"]["dtype"]
    assert policy_state and all(dtype(p, "exp_avg") == "float32" for p in policy_state)
    if precision == "bf16-mixed":
        assert all(dtype(p, "master") == "float32" for p in policy_state)


def test_grpo_runs_critic_free_and_resumes_exactly(setup):
    """`fusedrl grpo`'s path: no critic, group advantages, the KL as a loss term, dynamic sampling
    (its prompt position is part of the resumed state)."""
    root, policy_dir, prompts = setup

    def make_config(run):
        return GRPOConfig(policy=str(policy_dir), prompts_file=str(prompts), output_dir=str(root / run),
                          reward_fn="reward_testing:vowel_fraction",
                          rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                                kv_cache_memory=1 << 22, dynamic_sampling=True, overlong_buffer=2),
                          ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=3, vf_coef=0.0,
                                           kl_loss_coef=0.01),
                          train=LoopConfig(iterations=2, save_every=1, keep_checkpoints=0, progress=False,
                                           device="cpu"))
    a, b = run_straight_and_resumed(root, make_config, "grpo")
    assert all(torch.equal(a[k], b[k]) for k in a)
    checkpoint = root / "straight-grpo" / "checkpoints" / "step-00000002"
    saved = checkpoint_data(checkpoint)
    assert saved["models"] == ["policy"] and saved["modules"] == []                      # no critic
    train = [r for r in read_metrics(root / "straight-grpo") if r["kind"] == "train"]
    assert all("kl_loss" in r and "value_loss" not in r and "sampling_rounds" in r for r in train), train
    state = saved["loop"]
    assert state["prompts_drawn"] >= 2 * 2


def test_separate_critic_starts_from_the_reward_model(setup):
    root, policy_dir, _ = setup
    rm = reward_model_from_lm(load_model(policy_dir))
    torch.nn.init.normal_(rm.score.weight)
    critic = value_model_from_reward_model(rm)
    packed = pack_rollout([[11, 12, 13]], [[14, 15]], "cpu")
    with torch.no_grad():
        values = critic.response_values(packed)
        # The value read at the last response token's predicting position is the RM score of the
        # sequence without that token.
        score = rm.raw_rewards(rm.forward_packed(torch.tensor([11, 12, 13, 14]), [4]), [4])
    torch.testing.assert_close(values[0, 1], score[0])


def test_reward_model_run(setup):
    root, policy_dir, prompts = setup
    rm = reward_model_from_lm(load_model(policy_dir))
    save_reward_model(rm, root / "rm", source_dir=policy_dir)
    demos = write_jsonl(root / "demos.jsonl", [{"prompt": "hello", "response": " world"}] * 8)
    cfg = config(root, policy_dir, prompts, "with-rm", critic="separate", reward_fn=None,
                 reward_model=str(root / "rm"), ptx_file=str(demos), ppo=UpdateConfig(epochs=1, ptx_coef=0.5),
                 train=LoopConfig(iterations=1, progress=False, device="cpu"))
    final = train_ppo(cfg)
    assert (final / "config.json").exists() and (root / "with-rm" / "final_critic" / "model.safetensors").exists()
    train_rows = [r for r in read_metrics(root / "with-rm") if r["kind"] == "train"]
    for key in ("score_mean", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "explained_variance",
                "perplexity", "logprob_mismatch", "ptx_loss", "time_generate", "time_train", "tokens_per_s_train"):
        assert key in train_rows[-1], key


def test_cli_help_lists_every_section(capsys):
    from fusedrl.engine import cli
    with pytest.raises(SystemExit):
        cli.main(["ppo", "--help"])
    out = capsys.readouterr().out
    for key in ("rollout.temperature", "ppo.clip_eps", "reward.kl_target", "train.iterations", "critic"):
        assert key in out


def test_config_errors(setup):
    root, policy_dir, prompts = setup
    with pytest.raises(ValueError, match="^reward_model=.rm. with reward_fn=.m:f.: not supported"):
        PPOConfig(policy="p", prompts_file="f", output_dir="o", reward_model="rm", reward_fn="m:f")
    with pytest.raises(ValueError, match="ptx_coef > 0 needs ptx_file"):
        PPOConfig(policy="p", prompts_file="f", output_dir="o", reward_fn="m:f", ppo=UpdateConfig(ptx_coef=0.1))
    with pytest.raises(ValueError, match="ppo.estimator must be one of"):
        UpdateConfig(estimator="vtrace")
    with pytest.raises(ValueError, match="critic must be one of"):
        PPOConfig(policy="p", prompts_file="f", output_dir="o", reward_fn="m:f", critic="twin")

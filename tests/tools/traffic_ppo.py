"""Memory traffic of one PPO iteration, phase by phase, each next to its own floor.

Shape (SHAPE, small enough for the CPU): a Qwen2-style fp32 model (hidden 128, 4 heads over 2 KV
heads of 32, MLP 512, vocab 4096, 2 layers, tied embedding) as policy, frozen reference, reward
model and separate critic (a copy of the reward model); 8 prompts x 2 samples = 16 rows, prompts
of 16 tokens, 16 new tokens each (EOS ignored), temperature 1; one epoch of 2 minibatches of 8 rows
in micro-batches of 4, AdamW. Run on the path a GPU runs (`use_backend("triton")`, the Triton
interpreter on the CPU, with traffic_decode's torch oracles computing the sampler's and the paged
decode's results, as in the decode report). Phases as the trainer times them (engine/stages/ppo): generate, score,
reference, old (old log-probs and values), advantages (KL, rewards, GAE between them), update.

Floors (W_x: bytes of model x's distinct weights; kv: K and V of one token in all layers; R rows,
P prompt and T new tokens; ids and per-token outputs at their dtypes):
- generate: W_policy x (1 prefill + T - 1 decode steps) + the KV written (R x (P + T - 1) x kv) +
  the KV read by the decode steps (sum over step j = 1..T-1 of R x (P + j) x kv);
- score: W_rm + token ids read + R fp32 scores written;
- reference: W_ref + token ids read + R x T fp32 log-probs written;
- old: W_policy + W_critic + token ids read + R x T fp32 log-probs, entropies and values written;
- advantages: the per-token inputs read once (old and reference log-probs and values, [R, T] fp32,
  and the bool mask) and rewards, advantages and returns ([R, T] fp32) written once;
- update: per micro-batch, W read by the forward and again by the backward and the gradient
  written (and read back to accumulate after the first micro-batch), for policy and critic; per
  minibatch, AdamW reads parameters, gradients and both moments and writes parameters and moments
  (7 x W, fp32 state).

Host syncs are counted by phase, with the kernels' value-reading input checks as on a GPU (off:
`kernels.dispatch.sync_checks_enabled`; on CPU tensors they read values for free and always run).
The bar: outside generation, at most one per minibatch + 5 (`sync_budget`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from fusedrl.engine.config.ppo import LoopConfig, PPOConfig, RewardConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.inference.hybrid_actor import HybridActor
from fusedrl.engine.inference.runner import kv_bytes_per_block
from fusedrl.engine.model.reward_model import reward_model_from_lm
from fusedrl.engine.model.value_model import value_model_from_reward_model
from fusedrl.engine.stages.ppo.advantages import RunningMoments
from fusedrl.engine.stages.rollout.answer_rows import sample_and_score
from fusedrl.engine.stages.rollout.build import build_optimizers
from fusedrl.engine.stages.rollout.models import PPOModels
from fusedrl.engine.stages.rollout.phase_timer import PhaseTimer
from fusedrl.engine.stages.ppo.experience import ExperienceSettings, make_rollout
from fusedrl.engine.stages.rollout.reward_scores import reward_model_scorer
from fusedrl.engine.stages.ppo.update import UpdateSettings, ppo_update
from fusedrl.kernels import use_backend

from fusedrl.bench.traffic_count import TrafficCounter, weight_bytes
from fusedrl.bench.shapes import qwen_like
from traffic_decode import ORACLES
from value_checks import value_checks_as_on_gpu


@dataclass(frozen=True)
class Shape:
    prompts: int = 8
    samples: int = 2
    prompt_len: int = 16
    new_tokens: int = 16
    minibatches: int = 2
    micro: int = 4
    model: tuple = (("vocab_size", 4096), ("hidden_size", 128), ("intermediate_size", 512), ("num_heads", 4),
                    ("num_kv_heads", 2), ("head_dim", 32))
    layers: int = 2

    @property
    def rows(self) -> int:
        return self.prompts * self.samples


SHAPE = Shape()
PHASES = ("generate", "score", "reference", "old", "advantages", "update")


class CountingTimer(PhaseTimer):
    """The trainer's phase timer, also pointing the counter's region at the running phase; between
    phases it is "advantages" (KL, reward shaping, GAE, the rollout's metrics)."""

    def __init__(self, device, counter: TrafficCounter):
        super().__init__(device)
        self.counter = counter

    @contextlib.contextmanager
    def phase(self, name: str):
        self.counter.region = name
        with super().phase(name):
            yield
        self.counter.region = "advantages"


def sync_budget(shape: Shape) -> int:
    """The bar: host syncs of an iteration outside generation <= minibatches + 5."""
    return shape.minibatches + 5


def build(shape: Shape, device="cpu"):
    """(models, reward model, optimizers, config) of the stated shape, built in memory from random
    weights."""
    policy = qwen_like(shape.layers, torch.float32, device, **dict(shape.model), tie_word_embeddings=True)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rm = reward_model_from_lm(policy).eval().requires_grad_(False)
    # reward_model_from_lm starts the head at zero (every score 0); scores that differ, as a
    # trained reward model's do, from a random head.
    torch.nn.init.normal_(rm.score.weight, 0, 0.02)
    critic = value_model_from_reward_model(rm).requires_grad_(True).train()
    blocks = shape.rows * (-(-(shape.prompt_len + shape.new_tokens) // 16) + 1)
    actor = HybridActor(policy, kv_cache_memory=blocks * kv_bytes_per_block(policy.config, torch.float32, 16),
                        max_num_seqs=shape.rows, use_cuda_graphs=False)
    models = PPOModels(policy, reference, actor, critic, None, reward_model_scorer(rm))
    cfg = PPOConfig(policy="in-memory", reward_model="in-memory", critic="separate", prompts_file="-", output_dir="-",
                    rollout=RolloutConfig(prompts_per_iteration=shape.prompts, samples_per_prompt=shape.samples,
                                          max_prompt_length=shape.prompt_len, max_new_tokens=shape.new_tokens,
                                          ignore_eos=True, block_size=16),
                    ppo=UpdateConfig(epochs=1, minibatch_size=shape.rows // shape.minibatches,
                                     microbatch_size=shape.micro),
                    reward=RewardConfig(kl_coef=0.05), train=LoopConfig(iterations=1, device=device, progress=False))
    return models, rm, build_optimizers(models, cfg)[0], cfg


def floors(shape: Shape, models: PPOModels, rm) -> dict:
    """Each phase's floor in bytes (formulas in the module docstring)."""
    c = models.policy.config
    R, P, T = shape.rows, shape.prompt_len, shape.new_tokens
    kv = kv_bytes_per_block(c, torch.float32, 1)
    w_policy, w_critic = weight_bytes(models.policy), weight_bytes(models.critic)
    ids = R * (P + T) * 8  # int64 token ids of the packed rollout
    per_token = R * T * 4
    kv_read = sum(R * (P + j) * kv for j in range(1, T))
    micros = shape.rows // shape.micro
    per_micro = 3 * (w_policy + w_critic)
    accumulate = (micros - shape.minibatches) * (w_policy + w_critic)
    return {"generate": w_policy * T + R * (P + T - 1) * kv + kv_read,
            "score": weight_bytes(rm) + ids + R * 4,
            "reference": weight_bytes(models.reference) + ids + per_token,
            "old": w_policy + w_critic + ids + 3 * per_token,
            "advantages": 3 * per_token + R * T + 3 * per_token,
            "update": micros * per_micro + accumulate + shape.minibatches * 7 * (w_policy + w_critic)}


def ppo_report(shape: Shape = SHAPE, device="cpu") -> dict:
    """Counted bytes, floor and host syncs of each phase of one PPO iteration (see the docstring)."""
    torch.manual_seed(0)
    models, rm, optimizers, cfg = build(shape, device)
    prompts = torch.randint(10, dict(shape.model)["vocab_size"], (shape.prompts, shape.prompt_len)).tolist()
    counter = TrafficCounter(ORACLES if device == "cpu" else {})
    timer = CountingTimer(torch.device(device), counter)
    with use_backend("triton"), value_checks_as_on_gpu(), counter, counter.python_syncs():
        samples = sample_and_score(models, prompts, cfg.rollout, 0, timer)
        rollout = make_rollout(models, samples, ExperienceSettings.of(cfg), cfg.reward.kl_coef, RunningMoments(),
                               timer).rollout
        with timer.phase("update"):
            ppo_update(models, optimizers, rollout, UpdateSettings.of(cfg), seed=0)
    floor = floors(shape, models, rm)
    phases = {}
    for name in PHASES:
        read, written = counter.bytes[name]
        phases[name] = {"read": read, "written": written, "ops": counter.ops[name], "floor": floor[name],
                        "ratio": (read + written) / floor[name]}
    return {"shape": {"prompts": shape.prompts, "samples": shape.samples, "rows": shape.rows,
                      "prompt_tokens": shape.prompt_len, "new_tokens": shape.new_tokens, "layers": shape.layers,
                      **dict(shape.model), "dtype": "float32", "epochs": 1, "minibatches": shape.minibatches,
                      "micro_batch_rows": shape.micro, "device": device, "path": "triton",
                      "oracles": sorted(counter.stand_ins)},
            "phases": phases, "other": dict(zip(("read", "written"), counter.bytes["other"])),
            "host_syncs": dict(counter.syncs),
            "host_syncs_by_phase": {name: dict(kinds) for name, kinds in counter.region_syncs.items()},
            "host_syncs_outside_generation": sum(n for name, kinds in counter.region_syncs.items()
                                                 if name != "generate" for n in kinds.values()),
            "host_sync_budget": sync_budget(shape)}


def sync_phases(report: dict) -> str:
    """'phase kind n, ...' of a ppo_report's host syncs outside generation."""
    return ", ".join(f"{name} {kind} {n}" for name, kinds in sorted(report["host_syncs_by_phase"].items())
                     if name != "generate" for kind, n in sorted(kinds.items()))


def ppo_table(report: dict) -> str:
    """Markdown: one row per phase, counted against its floor."""
    mib = 2 ** 20
    s = report["shape"]
    lines = [f"One PPO iteration ({s['path']} path), {s['dtype']} model of {s['layers']} layers (hidden "
             f"{s['hidden_size']}, vocab {s['vocab_size']}); {s['prompts']} prompts x {s['samples']} samples, "
             f"{s['prompt_tokens']} prompt + {s['new_tokens']} new tokens; {s['epochs']} epoch of "
             f"{s['minibatches']} minibatches, micro-batches of {s['micro_batch_rows']} rows.", "",
             "| phase | ops | read MiB | written MiB | floor MiB | counted / floor |", "|---|---|---|---|---|---|"]
    for name, v in report["phases"].items():
        lines.append(f"| {name} | {v['ops']} | {v['read'] / mib:.2f} | {v['written'] / mib:.2f} | "
                     f"{v['floor'] / mib:.2f} | {v['ratio']:.2f} |")
    lines += ["", "host syncs in the iteration: " + ", ".join(f"{k} {n}" for k, n in sorted(report["host_syncs"].items())),
              "", f"host syncs outside generation: {report['host_syncs_outside_generation']} (budget "
              f"{report['host_sync_budget']} = minibatches + 5): {sync_phases(report)}"]
    return "\n".join(lines) + "\n"

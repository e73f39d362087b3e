"""Kernel launches and host syncs of the training step, counted on the CPU (no timing).

Counted with a TorchDispatchMode (`LaunchCounter`): every op that reaches the dispatcher is one
launch, except allocations, views and profiler marks (no kernel on a GPU); a custom op
(fusedrl::rms_norm, fusedrl::rope, ...) and a multi-tensor `torch._foreach_*` op count as one each,
as on a GPU they are one launch per dtype group (a multi-tensor kernel launches once per ~36 to ~110
tensors: noted, not counted). Host syncs as traffic_count counts them.

- per decoder layer, one training micro-batch's forward + backward (a packed forward, the fused LM
  head's log-probs, their backward): the count of a 2-layer model minus a 1-layer one, so the
  embedding, final norm and head cancel out. Run as the GPU runs it (`use_backend("triton")`, the
  kernels in the interpreter), on sequences of equal length: on the CPU the attention is then one
  SDPA call each way, as the varlen flash-attention call of a GPU. Next to it, the eager path
  (`use_backend("torch")`: the decoder's norms, RoPE and SiLU*up as eager ops, training's path
  before the fused kernels had a backward).
  The MoE layer (Qwen3-MoE-like, 8 experts, top-2, every layer sparse) is counted the same way,
  and its MoE block alone at a decode step (4 tokens, inference mode): what a CUDA graph would
  capture, with its host syncs (none: the grouped GEMMs' group sizes stay on the device).
- per optimizer step: FusedAdamW (engine/train/fused_adamw.py) with clipping and the loss check
  (optim.clip_and_step), a step after the first (which creates the state), for a Qwen2.5-0.5B-like
  parameter list (24 layers: 291 tensors) and for 300 tensors; and the former per-tensor loop's
  count for comparison (about 10 kernels per tensor, as the H100 profile showed).
- per PPO iteration: the host syncs outside generation, by phase, at traffic_ppo's shape (its
  counter, value-reading input checks as on a GPU), against the budget of minibatches + 5.
- the reward model's ranking loss (engine/stages/rm.py's ranking_loss_sum), forward + backward, on
  a micro-batch of 2 rankings and of 66 (64 pairs and a 3- and a 5-way ranking): the same count,
  every pair at once; and the former loop over the rankings' count for comparison.
- per SFT and RM optimizer step (engine/train/supervised.py's train_step, two micro-batches, a step
  after the first): the host syncs (launch_count's counter: tolist and cpu included), against a
  budget of one read per step (its stats, loss and gradient norm together), as PPO's minibatch.

    python tests/tools/launches.py                   # writes bench/results/launches.{json,md}
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fusedrl.bench import harness
from fusedrl.engine.config.train import DataConfig, RMConfig, SFTConfig
from fusedrl.engine.data.tokenization import TokenizedExample
from fusedrl.engine.model.causal_lm import CausalLM
from fusedrl.engine.model.lm_head import lm_head_logprobs
from fusedrl.engine.model.moe_config import MoEConfig
from fusedrl.engine.model.primitives import DECODE
from fusedrl.engine.model.reward_model import reward_model_from_lm
from fusedrl.engine.stages.rm import ranking_loss_sum, rm_stage
from fusedrl.engine.stages.sft import sft_stage
from fusedrl.engine.train.fused_adamw import FusedAdamW
from fusedrl.engine.train.optim import build_optimizer, build_scheduler, clip_and_step
from fusedrl.engine.train.supervised import step_forwards, train_step
from fusedrl.kernels import use_backend

from fusedrl.bench import launch_count
import traffic_ppo
from value_checks import value_checks_as_on_gpu
from fusedrl.bench.traffic_count import FREE, SYNC_OPS
from fusedrl.bench.shapes import qwen_like

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
# moe_layer_fwd_bwd: a Qwen3-MoE layer's (its router, sort, permutes and six grouped GEMMs beside a
# dense layer's attention and norms; 61 before the router took the k-wide softmax).
BUDGETS = {"layer_fwd_bwd": 30, "moe_layer_fwd_bwd": 52, "optimizer_step": 12, "supervised_step_syncs": 1,
           "moe_block_decode": 14, "ranking_loss": 17}
# The ranking loss's micro-batches: a pair and a 3-way ranking; 64 pairs, a 3- and a 5-way one.
RANKINGS = {"2 rankings": [2, 3], "66 rankings": [2] * 64 + [3, 5]}
# Small enough for the interpreter; launches do not depend on widths. Qwen2 has q/k/v biases,
# Qwen3 q/k norms and no biases.
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16)
ARCHS = {"qwen2": SMALL, "qwen3": dict(SMALL, model_type="qwen3", qkv_bias=False, qk_norm=True)}
MOE = dict(ARCHS["qwen3"], model_type="qwen3_moe", moe=MoEConfig(
    num_experts=8, top_k=2, intermediate_size=32, sparse_layers=(0, 1), norm_topk_prob=True, fp32_weights=False,
    router_aux_loss_coef=0.0, legacy_names=("mlp", "gate_proj", "up_proj", "down_proj")))
ARCHS["qwen3_moe"] = MOE


class LaunchCounter(TorchDispatchMode):
    """Within `with LaunchCounter() as c:`, c.launches[op name] and c.syncs[kind]."""

    def __init__(self):
        super().__init__()
        self.launches, self.syncs = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in FREE and not getattr(func, "is_view", False) and func.namespace != "profiler":
            self.launches[func.name()] += 1
        if func in SYNC_OPS:
            self.syncs[SYNC_OPS[func]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.launches.values())


def micro_batch_launches(arch: str, layers: int, backend: str, dtype=torch.float32) -> LaunchCounter:
    """Forward + backward of one packed micro-batch (2 sequences of 8 tokens, a label per token)."""
    torch.manual_seed(0)
    lm: CausalLM = qwen_like(layers, dtype, "cpu", **ARCHS[arch])
    ids = torch.randint(3, 256, (16,), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1)
    with use_backend(backend), value_checks_as_on_gpu():
        lm.forward_packed(ids, [8, 8])  # warm-up: per-(device, dtype) caches such as the cast RoPE tables
        with LaunchCounter() as counter:
            hidden = lm.forward_packed(ids, [8, 8])
            lm_head_logprobs(hidden, lm.lm_head.weight, labels).sum().backward()
    return counter


def per_layer(arch: str, backend: str) -> dict:
    one, two = (micro_batch_launches(arch, n, backend) for n in (1, 2))
    layer = two.launches - one.launches
    return {"launches": sum(layer.values()), "by_op": dict(sorted(layer.items())),
            "rest": one.total - sum(layer.values()), "syncs": dict(two.syncs)}


def moe_block_decode() -> LaunchCounter:
    """The MoE block of a decode step over 4 tokens (inference mode, the fused kernels)."""
    torch.manual_seed(0)
    block = qwen_like(1, torch.float32, "cpu", **MOE).model.layers[0].mlp
    h = torch.randn(4, MOE["hidden_size"])
    with use_backend("triton"), torch.inference_mode(), value_checks_as_on_gpu():
        block(h, DECODE)  # warm-up
        with LaunchCounter() as counter:
            block(h, DECODE)
    return counter


def parameter_list(n_tensors: int) -> list[torch.nn.Parameter]:
    """bf16 matrices and vectors in Qwen2.5-0.5B's proportion (of every 12 tensors 7 matrices)."""
    return [torch.nn.Parameter(torch.randn((8, 4) if i % 12 < 7 else (4,), dtype=torch.bfloat16))
            for i in range(n_tensors)]


def optimizer_launches(n_tensors: int) -> LaunchCounter:
    params = parameter_list(n_tensors)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = FusedAdamW(groups, lr=1e-4)
    for step in range(2):  # the first step creates the state; the second is the steady state
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype)
        loss = torch.tensor(1.0)
        if step:
            with LaunchCounter() as counter:
                clip_and_step([optimizer], 1.0, loss)
        else:
            clip_and_step([optimizer], 1.0, loss)
    return counter


def per_tensor_loop_launches(n_tensors: int) -> int:
    """The former MixedPrecisionAdamW step (upcast, decay, two moments, bias-corrected update, copy
    back per tensor) plus torch's clip_grad_norm_ without foreach: its steady-state launches."""
    params = parameter_list(n_tensors)
    states = [dict(master=p.detach().float(), exp_avg=torch.zeros(p.shape), exp_avg_sq=torch.zeros(p.shape))
              for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=p.dtype)
    with LaunchCounter() as counter, torch.no_grad():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)
        for p, s in zip(params, states):
            grad = p.grad.float()
            s["master"].mul_(1 - 1e-5)
            s["exp_avg"].lerp_(grad, 0.1)
            s["exp_avg_sq"].mul_(0.999).addcmul_(grad, grad, value=0.001)
            denom = (s["exp_avg_sq"] / 0.5).sqrt_().add_(1e-8)
            s["master"].addcdiv_(s["exp_avg"], denom, value=-1e-4)
            p.copy_(s["master"])
    return counter.total


def ranking_loss_launches(group_sizes: list[int]) -> dict:
    """Launches and host syncs of the reward model's ranking loss, forward + backward, over
    rankings of `group_sizes` responses."""
    rewards = torch.randn(sum(group_sizes), requires_grad=True)
    with launch_count.LaunchCounter() as counter:
        ranking_loss_sum(rewards, group_sizes)[0].backward()
    return {"launches": counter.launches, "syncs": dict(counter.syncs)}


def ranking_loop_launches(group_sizes: list[int]) -> int:
    """The former ranking loss, a loop over the rankings (each one's pairs, margins and mean),
    forward + backward: its launches."""
    rewards = torch.randn(sum(group_sizes), requires_grad=True)
    with launch_count.LaunchCounter() as counter:
        losses, correct = [], rewards.new_zeros(())
        for r in rewards.split(group_sizes):
            i, j = torch.triu_indices(len(r), len(r), offset=1)
            margin = r[i] - r[j]
            losses.append(-torch.nn.functional.logsigmoid(margin).mean())
            correct = correct + (margin > 0).sum()
        torch.stack(losses).sum().backward()
    return counter.launches


def supervised_step_syncs(stage_name: str) -> dict:
    """Host syncs of one SFT or RM (beta_rm > 0: its LM term too) optimizer step over two
    micro-batches on a 1-layer model at SMALL shapes, by kind; the step after the first (which
    creates the optimizer state), on the fused kernels with the value-reading checks as on a GPU.
    The sequences of a forward have equal lengths: unequal ones take the CPU's padded attention,
    whose plan is host tensors (no device sync; a GPU runs the varlen kernel)."""
    torch.manual_seed(0)
    lm = qwen_like(1, torch.float32, "cpu", **SMALL)
    common = dict(model="-", output_dir="-", data=DataConfig(train_file="-"))
    if stage_name == "sft":
        cfg, model = SFTConfig(**common), lm
        stage = sft_stage(torch.float32, "cpu")
        examples = [TokenizedExample([5, 6, 7], ([8, 9],)), TokenizedExample([10, 11], ([12, 13, 14, 15],))]
    else:
        cfg, model = RMConfig(**common, beta_rm=0.5), reward_model_from_lm(lm)
        stage = rm_stage(cfg, torch.float32, "cpu")
        examples = [TokenizedExample([5, 6], ([7, 8], [9, 10])), TokenizedExample([11], ([12, 13], [14, 15]))]
    forwards = step_forwards(stage, [examples[:1], examples[1:]], None)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    with use_backend("triton"), value_checks_as_on_gpu():
        train_step(model, stage, forwards, optimizer, scheduler, cfg, torch.device("cpu"))
        with launch_count.LaunchCounter() as counter:
            train_step(model, stage, forwards, optimizer, scheduler, cfg, torch.device("cpu"))
    return dict(counter.syncs)


def report() -> dict:
    layers = {arch: {backend: per_layer(arch, backend) for backend in ("triton", "torch")} for arch in ARCHS}
    optimizer = {n: optimizer_launches(n) for n in (291, 300)}
    decode = moe_block_decode()
    return {
        "moe_block_decode": {"launches": decode.total, "by_op": dict(sorted(decode.launches.items())),
                             "syncs": dict(decode.syncs)},
        "budgets": BUDGETS,
        "layer_fwd_bwd": layers,
        "optimizer_step": {str(n): {"launches": c.total, "by_op": dict(sorted(c.launches.items())),
                                    "syncs": dict(c.syncs)} for n, c in optimizer.items()},
        "per_tensor_loop_step": {"291": per_tensor_loop_launches(291)},
        "ppo_iteration": ppo_iteration_syncs(),
        "supervised_step_syncs": {name: supervised_step_syncs(name) for name in ("sft", "rm")},
        "ranking_loss": {name: ranking_loss_launches(sizes) for name, sizes in RANKINGS.items()},
        "ranking_loop": {name: ranking_loop_launches(sizes) for name, sizes in RANKINGS.items()},
    }


def ppo_iteration_syncs() -> dict:
    """Host syncs of one PPO iteration at traffic_ppo.SHAPE, outside generation and by phase."""
    r = traffic_ppo.ppo_report()
    return {key: r[key] for key in ("host_syncs_by_phase", "host_syncs_outside_generation", "host_sync_budget")}


def table(r: dict) -> str:
    lines = ["| measure | launches | budget |", "| --- | --- | --- |"]
    for arch, backends in r["layer_fwd_bwd"].items():
        fused, eager = backends["triton"], backends["torch"]
        budget = r["budgets"]["moe_layer_fwd_bwd" if arch == "qwen3_moe" else "layer_fwd_bwd"]
        lines.append(f"| {arch} decoder layer, forward + backward, fused kernels | {fused['launches']} | "
                     f"{budget} |")
        lines.append(f"| {arch} decoder layer, forward + backward, eager norms/RoPE/SiLU*up | "
                     f"{eager['launches']} | |")
    moe = r["moe_block_decode"]
    lines.append(f"| qwen3_moe MoE block at a decode step, 4 tokens (router to unpermute; host syncs: "
                 f"{sum(moe['syncs'].values())}) | {moe['launches']} | {r['budgets']['moe_block_decode']} |")
    for n, c in r["optimizer_step"].items():
        lines.append(f"| optimizer step, {n} tensors (FusedAdamW, clipped, loss checked; host syncs: "
                     f"{sum(c['syncs'].values())}) | {c['launches']} | {r['budgets']['optimizer_step']} |")
    lines.append(f"| optimizer step, 291 tensors, the former per-tensor loop + clip_grad_norm_ | "
                 f"{r['per_tensor_loop_step']['291']} | |")
    for name, c in r["ranking_loss"].items():
        lines.append(f"| reward model's ranking loss, forward + backward, {name} (host syncs: "
                     f"{sum(c['syncs'].values())}) | {c['launches']} | {r['budgets']['ranking_loss']} |")
    for name, launched in r["ranking_loop"].items():
        lines.append(f"| reward model's ranking loss, {name}, the former loop over rankings | {launched} | |")
    ppo = r["ppo_iteration"]
    lines += ["", "| measure | host syncs | budget |", "| --- | --- | --- |",
              f"| PPO iteration outside generation ({traffic_ppo.SHAPE.minibatches} minibatches; "
              f"{traffic_ppo.sync_phases(ppo)}) | {ppo['host_syncs_outside_generation']} | "
              f"{ppo['host_sync_budget']} |"]
    for name, syncs in r["supervised_step_syncs"].items():
        kinds = ", ".join(f"{k} x{v}" for k, v in syncs.items())
        lines.append(f"| {name.upper()} optimizer step of 2 micro-batches ({kinds}) | {sum(syncs.values())} | "
                     f"{r['budgets']['supervised_step_syncs']} |")
    return "\n".join(lines) + "\n"


def by_op_table(r: dict) -> str:
    lines = []
    for arch, backends in r["layer_fwd_bwd"].items():
        ops = backends["triton"]["by_op"]
        lines.append(f"{arch}, one decoder layer, fused: " + ", ".join(f"{k} x{v}" for k, v in ops.items()))
    lines.append("qwen3_moe MoE block, decode step: " + ", ".join(
        f"{k} x{v}" for k, v in r["moe_block_decode"]["by_op"].items()))
    c = r["optimizer_step"]["291"]["by_op"]
    lines.append("optimizer step: " + ", ".join(f"{k} x{v}" for k, v in c.items()))
    return "\n".join(f"- {line}" for line in lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(RESULTS / "launches"), help="output path without extension")
    args = p.parse_args()
    r = {"meta": harness.run_metadata(torch.device("cpu")), **report()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(r, indent=1) + "\n")
    text = ("# Kernel launches of the training step (counted on the CPU)\n\n"
            + harness.meta_line(r["meta"])
            + "Written by `python tests/tools/launches.py` (TRITON_INTERPRET=1 on the CPU); see its docstring for "
            "the counting rules.\n\n" + table(r) + "\nBy op:\n\n" + by_op_table(r))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

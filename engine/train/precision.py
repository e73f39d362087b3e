"""Training precision: which dtype the one weight copy has, and how it is optimized.

`bf16-mixed` (the default on CUDA): the model's parameters are bf16, the one copy the engine
generates from and the trainer differentiates; `MixedPrecisionAdamW` keeps fp32 master weights and
moments and copies each step's result into the bf16 parameters in place. No autocast anywhere: the
matmuls run in bf16 because the weights are bf16. `fp32` (the default on the CPU): fp32
parameters and plain AdamW. Kept in fp32 in both modes, where bf16's 8 bits of mantissa would show:
the value and score heads (values and rewards are regression outputs whose differences drive the
advantages), every loss, log-prob, KL and advantage (the kernels compute in fp32).

Bytes per trained parameter in bf16-mixed: 2 (bf16 weight) + 2 (bf16 gradient) + 4 (fp32 master)
+ 8 (fp32 AdamW moments) = 16; the step upcasts one gradient tensor at a time.
"""
from __future__ import annotations

from typing import get_args

import torch

from ..config.train import Precision


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16-mixed on CUDA, fp32 elsewhere; the others as given."""
    if name not in get_args(Precision):
        raise ValueError(f"train.precision must be one of {get_args(Precision)}, got {name!r}")
    if name == "auto":
        return "bf16-mixed" if device.type == "cuda" else "fp32"
    return name


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of the model's parameters under a resolved precision."""
    return torch.bfloat16 if precision == "bf16-mixed" else torch.float32


class MixedPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) over low-precision parameters, with an
    fp32 master copy and fp32 moments per parameter in the optimizer state.

    step(): for each parameter with a gradient, the gradient is upcast (one tensor at a time), the
    master weight takes the AdamW update in fp32, and the parameter is overwritten in place with the
    master rounded to its dtype, so updates below the parameter's resolution accumulate in the
    master instead of rounding away, and tensors captured elsewhere (CUDA graphs, the inference
    engine) keep pointing at the same storage. The state dict holds the masters: resume is exact.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer's, but the fp32 state stays fp32 (torch casts floating state to each
        parameter's dtype, which would round the masters and moments to bf16)."""
        super().load_state_dict(state_dict)
        # Saved parameters are named by their position (optimizer.state_dict()) or by their
        # qualified name (torch.distributed.checkpoint); either way the groups list them in order.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:  # a parameter that never had a gradient has no state
                continue
            for key in ("master", "exp_avg", "exp_avg_sq"):
                self.state[param][key] = saved[key].to(device=param.device, dtype=torch.float32, copy=True)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MixedPrecisionAdamW.step takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["master"] = p.detach().float().clone()
                    state["exp_avg"] = torch.zeros_like(state["master"])
                    state["exp_avg_sq"] = torch.zeros_like(state["master"])
                state["step"] += 1
                master, exp_avg, exp_avg_sq = state["master"], state["exp_avg"], state["exp_avg_sq"]
                grad = p.grad.float()
                master.mul_(1 - group["lr"] * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                del grad
                bias1, bias2 = 1 - beta1 ** state["step"], 1 - beta2 ** state["step"]
                denom = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
                master.addcdiv_(exp_avg, denom, value=-group["lr"] / bias1)
                p.copy_(master)

"""AdamW in a constant number of multi-tensor kernels per step, with fp32 master weights for
low-precision parameters, clipping by one global norm, and a skip decided on the device.

A step over N parameters (K hyperparameter groups, usually 2: decay and no decay) launches, whatever
N: the gradient upcast into one fp32 buffer (`torch._foreach_copy_`), the global L2 norm of that
buffer, the clip divisor max(norm / max_grad_norm, 1) and the skip flags (a few 0-dim ops), the step
counters (`torch._foreach_add_`), torch's fused AdamW once per group on the fp32 masters (the clip
divisor is its `grad_scale`, the skip flag its `found_inf`: a skipped step changes nothing), and the
copy of the masters into the low-precision parameters (`torch._foreach_copy_`): <= 12 kernels with
clipping and a loss check (tests/tools/launches.py counts them). Nothing reads a value on the host:
a non-finite norm or loss skips the step on the device, and the caller reads the norm with its other
metrics.

fp32 parameters are their own masters (no copy); bf16 ones get an fp32 master, updated in fp32 and
rounded into the parameter in place, so updates below bf16's resolution accumulate in the master and
tensors captured elsewhere (CUDA graphs, the inference engine) keep their storage. The state dict
per parameter is torch.optim.AdamW's (`step` as a 0-dim fp32 tensor, `exp_avg`, `exp_avg_sq`) plus
`master` for low-precision parameters, so checkpoints of torch's AdamW and of the former per-tensor
MixedPrecisionAdamW (an int `step`) load unchanged. Sharded (DTensor) parameters are stepped on
their local shards; the norm is summed over the shards (over the mesh dimensions that shard each).

Memory per trained bf16 parameter: 2 (weight) + 2 (gradient) + 4 (master) + 8 (moments) = 16 bytes,
plus 4 transient bytes during the step (the fp32 gradient buffer, freed when the step returns).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

STATE_KEYS = ("master", "exp_avg", "exp_avg_sq")


class StepGradients(NamedTuple):
    """The gradients one step applies: `params` in group order, `grads` their fp32 copies (views of
    one buffer, local shards when sharded), `norm` the global L2 norm of all of them ([] fp64)."""
    params: list
    grads: list
    norm: torch.Tensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage), a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _splits(placement) -> bool:
    """Whether a parameter's placement on a mesh dimension splits it: Shard, and FSDP2's
    _StridedShard (its data-dimension shard of a tensor-parallel slice cut on the same dim), which
    torch 2.13 does not count as is_shard()."""
    return not (placement.is_replicate() or placement.is_partial())


def _layout(param) -> tuple | None:
    """What the norm's reduction depends on: a DTensor's mesh and the mesh dimensions that shard it
    (None for a plain tensor, whole on every rank)."""
    if not hasattr(param, "placements"):
        return None
    return id(param.device_mesh), tuple(dim for dim, p in enumerate(param.placements) if _splits(p))


def _global_norm(local_norm: torch.Tensor, param) -> torch.Tensor:
    """The norm over every rank's shards: squares summed over the mesh dimensions that shard
    (FSDP2 shards every parameter alike; a replicated dimension holds copies, not parts)."""
    if not hasattr(param, "placements"):
        return local_norm
    squares = local_norm.square()
    for dim, placement in enumerate(param.placements):
        if _splits(placement):
            dist.all_reduce(squares, group=param.device_mesh.get_group(dim))
    return squares.sqrt()


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch.optim.AdamW's update) with fp32 masters for parameters
    that are not fp32; see the module docstring. `step()` alone is a plain AdamW step;
    `optim.clip_and_step` adds clipping and the skip."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _stepped_params(self) -> list:
        return [p for group in self.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def gradients(self) -> StepGradients:
        """Upcast every gradient into one fp32 buffer (one multi-tensor copy) and take its norm."""
        params = self._stepped_params()
        if not params:
            return StepGradients([], [], torch.zeros(()))
        grads = [_local(p.grad) for p in params]
        flat = torch.empty(sum(g.numel() for g in grads), dtype=torch.float32,
                           device=grads[0].device)
        grads32 = [view.view_as(g)
                   for view, g in zip(flat.split([g.numel() for g in grads]), grads)]
        torch._foreach_copy_(grads32, grads)
        # Summed in fp64: the norm's fp32 value (the clip divisor) is then the same whatever the
        # order of the sum, so a run on N ranks clips, and rounds into bf16, as one process does.
        layouts = [_layout(p) for p in params]
        if len(set(layouts)) == 1:
            local = torch.linalg.vector_norm(flat, dtype=torch.float64)
            return StepGradients(params, grads32, _global_norm(local, params[0]))
        # Parameters laid out differently (tensor-parallel slices beside whole norm weights every
        # rank holds alike; expert-parallel experts sharded over an expert group beside FSDP's
        # shards over the world): each layout's squares summed over the ranks that shard it, a copy
        # counted once.
        squares = []
        for layout in dict.fromkeys(layouts):
            mine = [i for i, other in enumerate(layouts) if other == layout]
            local = torch.linalg.vector_norm(torch.cat([grads32[i].reshape(-1) for i in mine]),
                                             dtype=torch.float64)
            squares.append(_global_norm(local, params[mine[0]]).square())
        return StepGradients(params, grads32, torch.stack(squares).sum().sqrt())

    def _state_of(self, param) -> dict:
        """The parameter's state, created at its first step (fp32 master, zero moments, step 0)."""
        state = self.state[param]
        if not state:
            master = (param.detach().to(torch.float32, copy=True) if param.dtype != torch.float32
                      else None)
            like = param if master is None else master
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(param).device)
            if master is not None:
                state["master"] = master
            state["exp_avg"] = torch.zeros_like(like, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(like, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None, *, gradients: Optional[StepGradients] = None,
             grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None):
        """One AdamW step on the gradients (`gradients()` unless given), each divided by
        `grad_scale` ([] fp32, the clip divisor) when given; `found_inf` ([] fp32) 1.0 makes the
        step a no-op, counters included, without a host sync (0.0 steps)."""
        if closure is not None:
            raise ValueError("FusedAdamW.step takes no closure")
        gradients = gradients if gradients is not None else self.gradients()
        if not gradients.params:
            return
        grad_of = {id(p): g for p, g in zip(gradients.params, gradients.grads)}
        states = {id(p): self._state_of(p) for p in gradients.params}
        steps = [s["step"] for s in states.values()]
        if found_inf is None:
            torch._foreach_add_(steps, 1.0)
        else:
            # The Tensor overload by name: Python's binding would turn a 0-dim tensor into a
            # Scalar, which reads it on the host.
            torch.ops.aten._foreach_add_.Tensor(steps, 1.0 - found_inf)
        low_params, low_masters = [], []
        for group in self.param_groups:
            params = [p for p in group["params"] if id(p) in grad_of]
            if not params:
                continue
            own = [states[id(p)] for p in params]
            masters = [_local(s["master"]) if "master" in s else _local(p)
                       for p, s in zip(params, own)]
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                masters, [grad_of[id(p)] for p in params], [_local(s["exp_avg"]) for s in own],
                [_local(s["exp_avg_sq"]) for s in own], [], [s["step"] for s in own],
                lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                eps=group["eps"], amsgrad=False, maximize=False, grad_scale=grad_scale,
                found_inf=found_inf)
            for p, s, master in zip(params, own, masters):
                if "master" in s:
                    low_params.append(_local(p))
                    low_masters.append(master)
        if low_params:
            torch._foreach_copy_(low_params, low_masters)

    def load_state_dict(self, state_dict: dict) -> None:
        """As Optimizer's, but the masters and moments stay fp32 (torch casts floating state to each
        parameter's dtype, which would round them to bf16) and `step` becomes a 0-dim fp32 tensor
        on the parameter's device (the fused kernel reads it there; older checkpoints hold an
        int)."""
        super().load_state_dict(state_dict)
        # Saved parameters are named by their position (optimizer.state_dict()) or by their
        # qualified name (torch.distributed.checkpoint); either way the groups list them in order.
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:  # a parameter that never had a gradient has no state
                continue
            state = self.state[param]
            for key in STATE_KEYS:
                if key in saved:
                    state[key] = saved[key].to(device=param.device, dtype=torch.float32, copy=True)
            step = saved["step"]
            step = step.item() if isinstance(step, torch.Tensor) else step  # once per resume
            state["step"] = torch.tensor(float(step), dtype=torch.float32,
                                         device=_local(param).device)

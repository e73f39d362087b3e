"""Trained parameters' gradients as views of one flat buffer per dtype and device, so that zeroing
them all is one fill per buffer, and put back on `param.grad` whatever zero_grad did since.

Why: a CUDA graph adds its gradients into the tensors the parameters held at capture, so before each
replay those tensors must be back on `.grad` and hold what an eager backward would add to. The H200
profile of a replayed 1k-token micro-batch (Qwen2.5-0.5B shape, 290 gradient tensors) found
`torch._foreach_zero_` over them taking about 6 ms of host a step (24 multi-tensor launches),
against 12.8 ms of device work for the whole forward and backward. Views of one buffer are zeroed
by one elementwise fill (one launch, the host's cost independent of the tensor count), as DDP's
`gradient_as_bucket_view` keeps its gradients.

Autograd adds into a `.grad` that is already set (in place, outside create_graph), so a view in a
buffer keeps receiving the sums; the buffers are the caller's to keep alive (a graph holds their
addresses). A parameter no backward reaches (an MoE expert no token chose) holds zeros, not None:
what a graph gives it too, and what an optimizer then decays and moves by its momentum.
"""
from __future__ import annotations

from collections import defaultdict

import torch


class FlatGradients:
    """The gradients of `params` as views of flat buffers, one per (dtype, device), each holding the
    value its parameter's `.grad` had (zeros where it had none), and set on `.grad`.

    params: the trained parameters (plain tensors: a sharded DTensor's gradient is not a view of a
    local buffer)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        groups: dict[tuple, list] = defaultdict(list)
        for p in params:
            if type(p.data) is not torch.Tensor:
                raise ValueError(f"FlatGradients: a parameter is a {type(p.data).__name__}: "
                                 "expected plain tensors (a sharded model's gradients are not "
                                 "views of one local buffer)")
            groups[(p.dtype, p.device)].append(p)
        self.params = list(params)
        self.buffers: list[torch.Tensor] = []
        # per buffer: its (parameter, view) pairs
        self.pairs: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        for (dtype, device), group in groups.items():
            buffer = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=device)
            pairs, start = [], 0
            for p in group:
                view = buffer[start:start + p.numel()].view(p.shape)
                if p.grad is not None:
                    view.copy_(p.grad)
                pairs.append((p, view))
                start += p.numel()
            self.buffers.append(buffer)
            self.pairs.append(pairs)
        self.reattach()

    def zero_(self) -> None:
        """Every gradient zeroed in place (one fill per buffer) and back on its parameter."""
        for buffer in self.buffers:
            buffer.zero_()
        self._put_back(zeroed=True)

    def reattach(self) -> None:
        """Each view back on its parameter's `.grad`, holding what an eager backward would add to:
        zeros where `.grad` was set to None (one fill for a buffer whose every gradient was,
        zero_grad()'s default; else one foreach zero of those), the values of a tensor that
        replaced it, untouched where `.grad` is still the view."""
        for buffer, pairs in zip(self.buffers, self.pairs):
            cleared = [view for p, view in pairs if p.grad is None]
            if len(cleared) == len(pairs):
                buffer.zero_()
            elif cleared:
                torch._foreach_zero_(cleared)
        self._put_back(zeroed=False)

    def _put_back(self, zeroed: bool) -> None:
        """Views onto `.grad`; a replacing tensor's values copied in first (unless `zeroed`: the
        caller asked for zeros)."""
        for pairs in self.pairs:
            for p, view in pairs:
                grad = p.grad
                if grad is view:
                    continue
                if grad is not None and not zeroed:
                    view.copy_(grad)  # torch's .grad setter has checked its shape and dtype
                p.grad = view

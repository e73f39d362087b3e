"""Our kernels behind transformers' module forwards: RMSNorm, rotary embedding, SiLU*up MLPs and a
causal LM whose forward with labels scores tokens straight from the LM head.

Each `*_forward(original)` returns a forward to put where `original` (the class's own, unbound)
was. It checks, on every call, that our kernel computes exactly what `original` would (dtypes,
activation, shapes) and calls `original` where it would not, so a patched model is never wrong,
only sometimes unfused. `with_global` gives attention forwards our `apply_rotary_pos_emb` without
touching transformers' module (the instance patch of transformers_patch.py).
"""
from __future__ import annotations

import functools
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..model import norm, rotary, swiglu
from ..rl.linear_logprobs import linear_token_logprobs

IGNORE_INDEX = -100


def rms_norm_forward(original):
    """A `*RMSNorm.forward(hidden_states)` (weight [C], variance_epsilon) through our rms_norm.

    transformers returns weight * x, promoted: a weight of another dtype than x goes to `original`.
    """
    @functools.wraps(original)
    def forward(self, hidden_states):
        if self.weight.dtype != hidden_states.dtype:
            return original(self, hidden_states)
        return norm.rms_norm(hidden_states.contiguous(), self.weight, self.variance_epsilon)
    return forward


def silu_types() -> tuple:
    """The modules that compute SiLU: torch's, and transformers' own where it has one (5.x)."""
    from transformers import activations
    return (nn.SiLU,) + tuple(getattr(activations, name) for name in ("SiLUActivation",)
                              if hasattr(activations, name))


def mlp_forward(original, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj"):
    """A gated MLP's forward, down(SiLU(gate(x)) * up(x)), through our silu_mul. The two
    projections stay the module's own (LoRA or quantized layers keep working) and are packed
    [..., 2F] for the kernel; another activation than SiLU goes to `original`."""
    silu = silu_types()

    @functools.wraps(original)
    def forward(self, x):
        if not isinstance(getattr(self, "act_fn", None), silu):
            return original(self, x)
        gate_up = torch.cat((getattr(self, gate)(x), getattr(self, up)(x)), dim=-1)
        return getattr(self, down)(swiglu.silu_mul(gate_up))
    return forward


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb through our rope: q [B, Hq, L, D] and k [B, Hk, L, D]
    (unsqueeze_dim=1; [B, L, H, D] with 2), cos/sin [B or 1, L, D] -> rotated (q, k) in q's
    layout. position_ids: unused, as in transformers 4 (transformers 5 has no such parameter: an
    int there is its positional unsqueeze_dim). Anything else (a partial rotary dim, another dtype
    for cos) goes to transformers' rotate-half formula."""
    if isinstance(position_ids, int):
        unsqueeze_dim = position_ids
    if (unsqueeze_dim not in (1, 2) or q.dim() != 4 or cos.dim() != 3
            or cos.shape[-1] != q.shape[-1] or cos.dtype != q.dtype or k.dtype != q.dtype):
        return _rotate_half_reference(q, k, cos, sin, unsqueeze_dim)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    batch, length = q.shape[:2]
    rows = batch * length
    cos = cos.expand(batch, length, -1).reshape(rows, -1).contiguous()
    sin = sin.expand(batch, length, -1).reshape(rows, -1).contiguous()
    q_rot, k_rot = rotary.rope(q.reshape(rows, q.shape[2], -1), k.reshape(rows, k.shape[2], -1),
                               cos, sin)
    q_rot, k_rot = q_rot.view(q.shape), k_rot.view(k.shape)
    if unsqueeze_dim == 1:  # back to [B, H, L, D]
        q_rot, k_rot = q_rot.transpose(1, 2), k_rot.transpose(1, 2)
    return q_rot, k_rot


def _rotate_half_reference(q, k, cos, sin, unsqueeze_dim):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def with_global(fn, name: str, value):
    """A copy of function `fn` that reads global `name` as `value` (its module is untouched),
    decorators included: a wrapper (functools.wraps, `__wrapped__`) is copied around a copy of the
    function it wraps."""
    inner = getattr(fn, "__wrapped__", None)
    closure = fn.__closure__
    replaced = None
    if inner is not None and closure:
        replaced = with_global(inner, name, value)
        closure = tuple(types.CellType(replaced) if _holds(cell, inner) else cell
                        for cell in closure)
    scope = fn.__globals__
    if name in fn.__code__.co_names:
        scope = module_with(scope["__name__"], name, value).__dict__
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, closure)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    if replaced is not None:
        copy.__wrapped__ = replaced
    return copy


def module_with(module_name: str, name: str, value) -> types.ModuleType:
    """A copy of module `module_name` whose `name` is `value`, made once. It is registered in
    sys.modules under its own name because torch.compile finds a function's globals by their
    module's name (to guard on them); the original module is never changed."""
    copy_name = f"{__name__}.{name}.{module_name}"
    copy = sys.modules.get(copy_name)
    if copy is None:
        copy = types.ModuleType(copy_name)
        copy.__dict__.update(vars(sys.modules[module_name]))
        copy.__name__, copy.__spec__ = copy_name, None
        setattr(copy, name, value)
        sys.modules[copy_name] = copy
    return copy


def _holds(cell, value) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


def causal_lm_forward(original):
    """A `*ForCausalLM.forward` whose call with `labels` [B, L] (transformers' convention: shifted
    inside, position t scored on labels[:, t + 1]) or `shift_labels` [B, L] (already shifted) never
    makes the [B, L, V] logits: the output's `logprobs` and `entropy` [B, L] fp32 (0 where the
    target is -100, the last position with `labels`), `loss` transformers' mean NLL (over
    `num_items_in_batch` when given; plus the router's auxiliary loss of a mixture of experts) and
    `logits` None. Without labels, or with positional arguments past input_ids, it is `original`.
    """
    @functools.wraps(original)
    def forward(self, input_ids=None, *args, labels=None, shift_labels=None, logits_to_keep=0,
                **kwargs):
        if (labels is None and shift_labels is None) or args:
            if shift_labels is not None:
                kwargs["shift_labels"] = shift_labels
            return original(self, input_ids, *args, labels=labels, logits_to_keep=logits_to_keep,
                            **kwargs)
        return _scored_forward(self, input_ids, labels, shift_labels, kwargs)
    return forward


def _scored_forward(model, input_ids, labels, shift_labels, kwargs):
    from .hf_outputs import CausalLMLogProbsOutput
    return_dict = kwargs.pop("return_dict", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    moe = hasattr(model, "router_aux_loss_coef")
    if moe:
        routed = kwargs.pop("output_router_logits", None)
        kwargs["output_router_logits"] = (model.config.output_router_logits if routed is None
                                          else routed)
    outputs = model.model(input_ids=input_ids, **kwargs)
    hidden = outputs.last_hidden_state  # [B, L, H]
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels: expected [B, L] = {tuple(hidden.shape[:-1])} (the input's "
                         f"positions), got {tuple(shift_labels.shape)}")
    head = model.lm_head
    logprobs, entropy = linear_token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]).to(head.weight.dtype), head.weight,
        shift_labels.reshape(-1).to(hidden.device), bias=head.bias, return_entropy=True)
    logprobs, entropy = logprobs.view(shift_labels.shape), entropy.view(shift_labels.shape)
    scored = shift_labels != IGNORE_INDEX
    count = num_items if num_items is not None else scored.sum()
    loss = -logprobs.sum() / count
    aux_loss = None
    if moe and kwargs["output_router_logits"]:
        aux_loss = _router_aux_loss(model, outputs.router_logits, kwargs.get("attention_mask"))
        loss = loss + model.router_aux_loss_coef * aux_loss.to(loss.device)
    # the decoder's other outputs as they come (transformers 5.2x names its cache `cache`)
    rest = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
    out = CausalLMLogProbsOutput(loss=loss, logprobs=logprobs, entropy=entropy,
                                 aux_loss=aux_loss, **rest)
    return out.to_tuple() if return_dict is False else out


def _router_aux_loss(model, router_logits, attention_mask):
    """The load-balancing loss of transformers' own modeling module for this model (found through
    the class's bases: FSDP2 makes the model's class a subclass defined elsewhere)."""
    for cls in type(model).__mro__:
        loss = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if loss is not None:
            return loss(router_logits, model.num_experts, model.num_experts_per_tok,
                        attention_mask)
    raise TypeError(f"model: no load_balancing_loss_func in the modules of "
                    f"{type(model).__name__}'s classes")

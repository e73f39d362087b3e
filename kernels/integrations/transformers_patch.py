"""Our kernels in a transformers model, one line: `patch_model(model)` on a live model,
`patch_model_type("qwen2")` on transformers' classes, for Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE
and Mixtral.

The ops, each with its switch: `rms_norm` (every *RMSNorm, Qwen3's q/k norms included), `rope`
(the attention's apply_rotary_pos_emb), `swiglu` (the gated MLPs: SiLU(gate) * up; the fused
3-D expert tensors of transformers 5's mixture-of-experts blocks stay transformers' code) and
`lm_head` (the causal LM's forward with labels returns per-token log-probs and entropy from
linear_token_logprobs, never the logits: hf_forwards.causal_lm_forward).

`patch_model` sets forwards on the model's own submodules (instance attributes): nothing global
changes, other models of the same class are untouched, and `unpatch_model` removes them.
`patch_model_type` replaces the forwards of the model type's classes and the modeling module's
apply_rotary_pos_emb: every model of that type, existing or future, is patched, until
`unpatch_model_type`. Either way a call our kernels cannot serve exactly goes to transformers' own
code (hf_forwards.py).
"""
from __future__ import annotations

import importlib
import types

from . import hf_forwards

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
ROPE_FUNCTION = "apply_rotary_pos_emb"
# gated MLP classes by their projections' names: (gate, up, down)
MLP_PROJECTIONS = {"gate_proj": ("gate_proj", "up_proj", "down_proj"), "w1": ("w1", "w3", "w2")}
PATCH_MARK = "fusedrl_patch"
# (class, attribute) -> what patch_model_type replaced; module-wide by design (see above)
_class_originals: dict = {}


def modeling_module(model_type: str):
    """transformers' modeling module of `model_type` (one of MODEL_TYPES)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: {model_type!r} is not supported; expected one of "
                         f"{', '.join(MODEL_TYPES)}")
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _calls_rope(forward) -> bool:
    while forward is not None:
        if ROPE_FUNCTION in forward.__code__.co_names:
            return True
        forward = getattr(forward, "__wrapped__", None)
    return False


def _mlp_projections(cls):
    names = cls.__init__.__code__.co_names
    return next((p for key, p in MLP_PROJECTIONS.items() if key in names), None)


def patched_forwards(modeling, *, rms_norm: bool, rope: bool, swiglu: bool, lm_head: bool,
                     rope_in_place: bool) -> dict:
    """{class of `modeling`: its new forward} for the chosen ops. rope_in_place: the attention
    forwards read a copy of the module's globals holding our apply_rotary_pos_emb (patch_model);
    otherwise they keep theirs (patch_model_type replaces the module's function instead)."""
    out = {}
    for name, cls in vars(modeling).items():
        if not isinstance(cls, type) or cls.__module__ != modeling.__name__:
            continue
        forward = cls.__dict__.get("forward")
        if forward is None:
            continue
        if rms_norm and name.endswith("RMSNorm"):
            out[cls] = hf_forwards.rms_norm_forward(forward)
        elif swiglu and name.endswith("MLP") and _mlp_projections(cls) is not None:
            out[cls] = hf_forwards.mlp_forward(forward, *_mlp_projections(cls))
        elif rope and rope_in_place and name.endswith("Attention") and _calls_rope(forward):
            out[cls] = hf_forwards.with_global(forward, ROPE_FUNCTION,
                                               hf_forwards.apply_rotary_pos_emb)
        elif lm_head and name.endswith("ForCausalLM"):
            out[cls] = hf_forwards.causal_lm_forward(forward)
    for forward in out.values():
        setattr(forward, PATCH_MARK, True)
    return out


def _model_type(model) -> str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model: a transformers model of type {', '.join(MODEL_TYPES)} expected, "
                         f"got {type(model).__name__} (model_type {model_type!r})")
    return model_type


def patch_model(model, *, rms_norm: bool = True, rope: bool = True, swiglu: bool = True,
                lm_head: bool = True):
    """Route `model`'s (a live transformers model) chosen ops through our kernels; returns `model`.

    Sets exactly the chosen ops (a second call with other switches replaces the first). Forward
    and backward are transformers' up to rounding; the forward with labels returns
    CausalLMLogProbsOutput (hf_outputs.py) when lm_head. Only this model changes.
    """
    modeling = modeling_module(_model_type(model))
    unpatch_model(model)
    forwards = patched_forwards(modeling, rms_norm=rms_norm, rope=rope, swiglu=swiglu,
                                lm_head=lm_head, rope_in_place=True)
    for module in model.modules():
        for cls, forward in forwards.items():
            if isinstance(module, cls):
                module.forward = types.MethodType(forward, module)
                break
    return model


def unpatch_model(model):
    """Remove what patch_model set on `model`; returns `model`."""
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if getattr(getattr(forward, "__func__", None), PATCH_MARK, False):
            del module.forward
    return model


def patch_model_type(model_type: str, *, rms_norm: bool = True, rope: bool = True,
                     swiglu: bool = True, lm_head: bool = True) -> None:
    """Route the chosen ops of every transformers model of `model_type` (one of MODEL_TYPES)
    through our kernels by replacing its classes' forwards and its modeling module's
    apply_rotary_pos_emb: a process-wide change, models built before included, undone by
    unpatch_model_type. Sets exactly the chosen ops."""
    modeling = modeling_module(model_type)
    unpatch_model_type(model_type)
    forwards = patched_forwards(modeling, rms_norm=rms_norm, rope=rope, swiglu=swiglu,
                                lm_head=lm_head, rope_in_place=False)
    targets = [(cls, "forward", forward) for cls, forward in forwards.items()]
    if rope:
        targets.append((modeling, ROPE_FUNCTION, hf_forwards.apply_rotary_pos_emb))
    for owner, attribute, value in targets:
        _class_originals[(owner, attribute)] = vars(owner)[attribute]
        setattr(owner, attribute, value)


def unpatch_model_type(model_type: str) -> None:
    """Give `model_type`'s classes and modeling module back what patch_model_type replaced."""
    modeling = modeling_module(model_type)
    for (owner, attribute) in [key for key in _class_originals
                               if key[0] is modeling or getattr(key[0], "__module__", None)
                               == modeling.__name__]:
        setattr(owner, attribute, _class_originals.pop((owner, attribute)))

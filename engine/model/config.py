"""Model configuration: the fields of a Hugging Face `config.json` that the engine's decoder needs.

Read with transformers' AutoConfig so every alias and legacy spelling it understands is understood
here too; anything the decoder cannot reproduce exactly is refused with a message naming what is
supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .moe_config import UNSUPPORTED_MOE, MoEConfig, moe_from_hf
from .vision.spec import VISION_FAMILIES, VisionSpec

# model_type -> (q/k/v bias, o_proj bias, mlp bias, q/k RMSNorm) as functions of the HF config,
# mirroring the nn.Linear(..., bias=...) choices in each transformers modeling file.
_ARCHS = {
    "llama": lambda c: (c.attention_bias, c.attention_bias, c.mlp_bias, False),
    "mistral": lambda c: (False, False, False, False),
    "qwen2": lambda c: (True, False, False, False),
    "qwen3": lambda c: (c.attention_bias, c.attention_bias, False, True),
    "qwen3_moe": lambda c: (c.attention_bias, c.attention_bias, False, True),
    "mixtral": lambda c: (False, False, False, False),
}
SUPPORTED_ARCHS = tuple(_ARCHS) + tuple(VISION_FAMILIES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# config.json's sizes, required and optional (HF names): ints the kernels' int32 offsets can index.
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads",
          "max_position_embeddings")
_OPTIONAL_SIZES = ("num_key_value_heads", "head_dim")
_MAX_SIZE = 2**31 - 1
# Deeper than any model published (the largest have ~130 layers): transformers' own validation of a
# config.json takes seconds per 10^5 layers, so a deeper one is refused before it reads the file.
MAX_LAYERS = 4096


@dataclass
class ModelConfig:
    """Shapes and options of one Llama-family decoder. `hf_config` is kept to save the model
    back."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # rope_parameters minus rope_theta
    eos_token_ids: tuple[int, ...] = ()
    # the sparse layers' experts (moe_config.py); None: every layer dense
    moe: MoEConfig | None = None
    # a vision-language model's images (vision/spec.py); None: a text model
    vision: VisionSpec | None = None
    torch_dtype: torch.dtype | None = None
    hf_config: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling.get("rope_type", "default")

    @staticmethod
    def check_model_type(model_type, architectures=None) -> None:
        """ValueError unless `model_type` (config.json's) is one the decoder implements."""
        if model_type in UNSUPPORTED_MOE:
            raise ValueError(
                f"unsupported model_type {model_type!r}: its {UNSUPPORTED_MOE[model_type]} "
                f"are not implemented; supported: {', '.join(SUPPORTED_ARCHS)}")
        if model_type not in _ARCHS and model_type not in VISION_FAMILIES:
            raise ValueError(
                f"unsupported model_type {model_type!r} (architectures={architectures}); "
                f"supported: {', '.join(SUPPORTED_ARCHS)}")

    @staticmethod
    def check_depth(raw: dict) -> None:
        """ValueError when config.json's num_hidden_layers (as read, before transformers)
        exceeds MAX_LAYERS."""
        layers = raw.get("num_hidden_layers")
        if isinstance(layers, int) and layers > MAX_LAYERS:
            raise ValueError(f"config.json: num_hidden_layers={layers} exceeds {MAX_LAYERS}, "
                             "deeper than any model the engine serves")

    @staticmethod
    def check_present(raw: dict) -> None:
        """ValueError naming the first size of _SIZES that config.json (as read, or its
        text_config) leaves out: transformers would put its class's default in its place (Llama 2
        7B's: hidden_size 4096, max_position_embeddings 2048), a model of other shapes than the
        weights, found at the first tensor at best and never for the context length."""
        text = raw.get("text_config")
        text = text if isinstance(text, dict) else {}
        for name in _SIZES:
            if name not in raw and name not in text:
                raise ValueError(f"config.json has no {name}: expected the model's own (an int), "
                                 "not the default transformers would put in its place")

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        """Validate a transformers config and copy out what the decoder needs (a vision-language
        model's: its text_config's, with `vision` from the whole)."""
        model_type = getattr(hf_config, "model_type", None)
        cls.check_model_type(model_type, getattr(hf_config, "architectures", None))
        if model_type in VISION_FAMILIES:
            text = cls.from_text(hf_config.text_config, VISION_FAMILIES[model_type])
            text.model_type, text.hf_config = model_type, hf_config
            text.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
            text.torch_dtype = _dtype(hf_config) or text.torch_dtype
            text.vision = VisionSpec.from_hf(hf_config, text.head_dim)
            return text
        return cls.from_text(hf_config, model_type)

    @classmethod
    def from_text(cls, hf_config, model_type: str) -> "ModelConfig":
        """The decoder of `hf_config`, a config of architecture `model_type` (one of _ARCHS)."""
        _check_sizes(hf_config)
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; supported: silu")
        rope = dict(_rope_parameters(hf_config))
        rope_theta = float(rope.pop("rope_theta"))
        rope_type = rope.setdefault("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"unsupported rope type {rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1.0 is not supported")
        qkv_bias, o_bias, mlp_bias, qk_norm = _ARCHS[model_type](hf_config)
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        eos = getattr(hf_config, "eos_token_id", None)
        eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_model_len=_max_model_len(hf_config),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=bool(qkv_bias), o_bias=bool(o_bias), mlp_bias=bool(mlp_bias), qk_norm=qk_norm,
            rope_theta=rope_theta, rope_scaling=rope, eos_token_ids=eos,
            torch_dtype=_dtype(hf_config),
            moe=moe_from_hf(hf_config, model_type), hf_config=hf_config,
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2], fp32, computed as transformers computes
        them."""
        dim = self.head_dim
        inv_freq = 1.0 / (
            self.rope_theta ** (
                torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
        if self.rope_type == "linear":
            return inv_freq / self.rope_scaling["factor"]
        if self.rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, self.rope_scaling)
        return inv_freq


def _dtype(hf_config) -> torch.dtype | None:
    """config.json's dtype (transformers 5's `dtype`, 4.x's `torch_dtype`), or None."""
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _rope_parameters(hf_config) -> dict:
    """transformers >= 5 keeps rope settings in `rope_parameters`; 4.x in rope_theta +
    rope_scaling."""
    params = getattr(hf_config, "rope_parameters", None)
    if params and "rope_theta" in params:
        # per-layer-type dicts (not used by these archs, but be explicit)
        if "full_attention" in params:
            raise ValueError("per-layer-type rope_parameters are not supported")
        return params
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    return scaling


def _check_sizes(hf_config) -> None:
    """ValueError naming the first size of config.json that is not an int in [1, 2**31 - 1], or an
    rms_norm_eps that is not a finite number > 0 (before any of them shapes a tensor)."""
    for name in _SIZES + _OPTIONAL_SIZES:
        value = getattr(hf_config, name, None)
        if value is None and name in _OPTIONAL_SIZES:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX_SIZE:
            raise ValueError(f"config.json: {name}={value!r} must be an int in [1, {_MAX_SIZE}]")
    eps = getattr(hf_config, "rms_norm_eps", None)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"config.json: rms_norm_eps={eps!r} must be a finite number > 0")


def _max_model_len(hf_config) -> int:
    """Longest sequence the engine accepts. A sliding window (Mistral, some Qwen2) caps it, so that
    full causal attention, which is all the engine implements, is exactly what the model
    computes."""
    max_len = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", True)  # Qwen2 gates its window with this
    if window and uses_window:
        max_len = min(max_len, window)
    return max_len


def _llama3_inv_freq(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1 frequency smoothing, step for step as in transformers'
    `_compute_llama3_parameters`."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)

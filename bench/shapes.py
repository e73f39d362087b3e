"""The named model shapes a benchmark runs (`model=qwen2.5-0.5b | ...`): the published config.json
fields that set the cost (sizes, heads, experts, vocabulary), random weights, nothing downloaded.

`hf_config(name, quick)` is the transformers config of a named shape (quick: the same architecture
at a tiny size, for a CPU run); `model_dir(name_or_path, ...)` writes its random-init checkpoint
into a new temporary directory, or returns a local Hugging Face directory as it is; `qwen_like`
builds the engine's CausalLM of Qwen2.5-0.5B's shape directly (the counters and the train step),
`random_causal_lm` any ModelConfig's.

Random weights are drawn on the device the benchmark runs on: the host draws them on one thread
(a Qwen2.5-0.5B from its transformers config took 9.7 s on 2 CPU cores, its 494M normal samples
alone 3.9 s), a GPU in milliseconds, and every GPU row that built a model paid the host's draw in
its setup (bench/results/2026-11-28-h200: 8.8-9.9 s of setup in the train, GRPO and PPO rows).
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

# (transformers config class, its fields): the published config.json values that shape the cost.
_QWEN2 = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
              eos_token_id=151643)
QWEN25_05B = dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                  tie_word_embeddings=True)
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                 max_position_embeddings=40960, rope_theta=1000000.0, tie_word_embeddings=True,
                 rms_norm_eps=1e-6, eos_token_id=151645)
QWEN3_30B_A3B = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                     num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                     intermediate_size=6144, num_hidden_layers=48, vocab_size=151936,
                     norm_topk_prob=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, tie_word_embeddings=False,
                     eos_token_id=151645)
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", QWEN25_05B),
    "qwen2.5-1.5b": ("Qwen2Config", dict(_QWEN2, hidden_size=1536, intermediate_size=8960,
                                         num_hidden_layers=28, num_attention_heads=12,
                                         num_key_value_heads=2, vocab_size=151936,
                                         tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(_QWEN2, hidden_size=3584, intermediate_size=18944,
                                       num_hidden_layers=28, num_attention_heads=28,
                                       num_key_value_heads=4, vocab_size=152064,
                                       tie_word_embeddings=False)),
    "qwen3-0.6b": ("Qwen3Config", QWEN3_06B),
    "llama-3.1-8b": ("LlamaConfig", dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False, eos_token_id=128001,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", QWEN3_30B_A3B),
}
# --quick: each architecture at a size a CPU runs in seconds (vocabulary 512, 2 layers).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
            tie_word_embeddings=True, eos_token_id=2)
_TINY_EXTRA = {"Qwen3Config": dict(head_dim=16),
               "Qwen3MoeConfig": dict(head_dim=16, num_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=32, tie_word_embeddings=False)}


# The headline set's kernel shapes (docs/bench.md): the small RL ops (batch x steps, fp32); the
# fused log-prob + entropy at TRL's shape (tokens, hidden, vocabulary); the fused head's memory at
# Liger's (tokens, hidden, vocabulary); --quick: shapes a CPU runs in seconds whose [N, V] logits
# (32-64 MiB in fp32) still set the fused paths' memory apart.
RL_OPS = (256, 2048)
TRL_LOGPROBS, TRL_LOGPROBS_QUICK = (8192, 4096, 151936), (256, 64, 32768)
LIGER_HEAD, LIGER_HEAD_QUICK = (4096, 4096, 128256), (512, 64, 32768)
DISTILL_QUICK = (256, 64, 32768)


def moe_decode_shape(quick: bool) -> dict:
    """Qwen3-30B-A3B's layer shape (Qwen3MoeConfig's fields but the layer count), quick: at
    TINY's size."""
    fields = {k: v for k, v in QWEN3_30B_A3B.items() if k != "num_hidden_layers"}
    if quick:
        tiny = {**TINY, **_TINY_EXTRA["Qwen3MoeConfig"]}
        fields.update({k: v for k, v in tiny.items() if k != "num_hidden_layers"})
    return fields


def hf_config(name: str, quick: bool = False):
    """The transformers config of the named shape (`SHAPES`); quick: its architecture at TINY's
    size."""
    if name not in SHAPES:
        raise ValueError(f"model={name!r}: expected one of {', '.join(SHAPES)} or a local "
                         f"Hugging Face directory")
    import transformers
    cls_name, fields = SHAPES[name]
    if quick:
        keep = {k: v for k, v in fields.items() if k in ("rope_theta", "rms_norm_eps")}
        fields = {**keep, **TINY, **_TINY_EXTRA.get(cls_name, {})}
    return getattr(transformers, cls_name)(**fields)


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """A checkpoint directory a benchmark loads; `made`: written here (and removed by `remove`)."""
    path: Path
    label: str
    made: bool

    def remove(self) -> None:
        if self.made:
            import shutil
            shutil.rmtree(self.path, ignore_errors=True)


def model_label(model: str, quick: bool, seed: int) -> str:
    """How a run's rows name their checkpoint: a local directory, or a named shape's random init."""
    if os.path.isdir(model):
        return f"{model} (local)"
    return f"{model} shape ({'tiny ' if quick else ''}random init, seed {seed})"


def model_dir(model: str, quick: bool, seed: int, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> ModelDir:
    """A local Hugging Face directory as it is, or the named shape's random-init checkpoint (seeded,
    its weights drawn on `device`) written to a new temporary directory."""
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ValueError(f"model={model}: a directory without config.json")
        return ModelDir(Path(model), model_label(model, quick, seed), False)
    import transformers
    config = hf_config(model, quick)
    torch.manual_seed(seed)
    path = random_checkpoint(
        lambda: transformers.AutoModelForCausalLM.from_config(config).to(dtype), device,
        "fusedrl_bench_model_")
    return ModelDir(path, model_label(model, quick, seed), True)


def random_checkpoint(make: Callable, device: str | torch.device, prefix: str) -> Path:
    """make() (a transformers model from its config) run on `device`, its weights drawn there,
    and written to a new temporary directory (returned); on a GPU the draw's memory goes back to
    the driver after, for the engine that loads the checkpoint."""
    with torch.device(device):
        model = make()
    path = Path(tempfile.mkdtemp(prefix=prefix))
    model.save_pretrained(path)
    del model
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return path


# The engine's own config names for Qwen2.5-0.5B (engine/model/config.py's ModelConfig).
ENGINE_QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_heads=14, num_kv_heads=2, head_dim=64,
                         rms_norm_eps=1e-6, max_model_len=1024, tie_word_embeddings=True,
                         qkv_bias=True, o_bias=False, mlp_bias=False, qk_norm=False,
                         rope_theta=1e6)


def random_causal_lm(config, dtype: torch.dtype, device: str | torch.device,
                     std: Callable[[str], float] = lambda name: 0.02):
    """The engine's CausalLM of `config` (a ModelConfig), allocated on `device` and its weights
    drawn there: normal(0, std(parameter name)) (bytes and FLOPs do not depend on the values)."""
    from fusedrl.engine.model.causal_lm import CausalLM
    with torch.device(device):
        model = CausalLM(config, dtype).to(device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, std(name))
    return model


def qwen_like(layers: int, dtype: torch.dtype, device: str, **overrides):
    """A randomly initialized engine CausalLM of Qwen2.5-0.5B's shapes with `layers` layers and
    `overrides` (ModelConfig's names); normal(0, 0.02) weights drawn on `device`."""
    from fusedrl.engine.model.config import ModelConfig
    config = ModelConfig(**{**ENGINE_QWEN25_05B, "num_layers": layers, **overrides})
    return random_causal_lm(config, dtype, device)

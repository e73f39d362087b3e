"""What a model's weights weigh, from its config.json alone (arithmetic, nothing built: a config of
10^6 layers is counted as fast as one of two), and the refusal of a model that cannot fit the
memory of the device it would be loaded on, before any allocation: a config.json naming absurd
sizes is one line, never a multi-terabyte allocation or minutes of building layers."""
from __future__ import annotations

import os

import torch

from ..errors import ModelError
from .config import ModelConfig


def parameter_count(config: ModelConfig) -> int:
    """Elements of the decoder's parameters (CausalLM: embeddings, layers, final norm, LM head
    unless tied), the experts of the sparse layers included."""
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_heads * d, config.num_kv_heads * d
    attention = h * q + 2 * h * kv + q * h + config.qkv_bias * (q + 2 * kv) + config.o_bias * h
    attention += 2 * d * config.qk_norm
    dense = 3 * h * config.intermediate_size + config.mlp_bias * (2 * config.intermediate_size + h)
    sparse_layers = len(config.moe.sparse_layers) if config.moe is not None else 0
    sparse = 0
    if config.moe is not None:
        # the experts and the router
        sparse = config.moe.num_experts * (3 * h * config.moe.intermediate_size + h)
    layers = config.num_layers * (attention + 2 * h) + (config.num_layers - sparse_layers) * dense
    layers += sparse_layers * sparse
    embeddings = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + layers + h


def device_memory(device: torch.device) -> int:
    """Bytes the weights could at most use on `device`: a GPU's total memory; on the CPU the memory
    the system has available now (MemAvailable), else its physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def refuse_unfit_weights(config: ModelConfig, dtype: torch.dtype, device, where,
                         ranks: int = 1) -> None:
    """ModelError naming `where` (the model directory) when the weights of `config` in `dtype`,
    split over `ranks` processes (sharded), exceed the memory of `device` (`device_memory`)."""
    device = torch.device(device)
    if device.type == "meta":
        return
    element = torch.empty((), dtype=dtype).element_size()
    need = parameter_count(config) * element // max(ranks, 1)
    have = device_memory(device)
    if need > have:
        per_rank = " per rank" if ranks > 1 else ""
        raise ModelError(f"{where}: config.json describes {parameter_count(config):,} parameters, "
                         f"{_size(need)} of {str(dtype).removeprefix('torch.')} weights{per_rank}, "
                         f"more than the {_size(have)} of memory {device} has: not loaded")


def _size(count: int) -> str:
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"

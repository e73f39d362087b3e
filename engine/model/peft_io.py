"""LoRA adapters in and out as a PEFT adapter directory, which `peft.PeftModel.from_pretrained`
loads onto the transformers base model:

    adapter_config.json          peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight [r, in] and
                                 .lora_B.weight [out, r] per adapted projection, in the Hugging Face
                                 module paths (a packed q/k/v writes q_proj, k_proj and v_proj)

Reading accepts what this writes and what PEFT writes for plain LoRA; options this engine does not
implement (DoRA, rsLoRA, per-module ranks, bias training) are a one-line ModelError, never ignored.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config.lora import LoRAConfig
from ..durable import check_finite
from ..errors import ModelError
from .hf_io import load_model, save_model
from .lora import LoRA, add_lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
# PEFT options that change the adapters' math: read only at these values.
_PLAIN_LORA = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "lora_bias": False}


def tensor_names(target_path: str) -> tuple[str, str]:
    """PEFT's names of one target's A and B, e.g. for model.layers.0.self_attn.q_proj."""
    return f"{PREFIX}{target_path}.lora_A.weight", f"{PREFIX}{target_path}.lora_B.weight"


def save_adapter(lora: LoRA, out_dir, base_model: str | None = None) -> None:
    """Write `lora` as a PEFT adapter directory `out_dir` (created; files replaced). `base_model`:
    the directory or hub id recorded as base_model_name_or_path."""
    tensors = {}
    for path, a, b in lora.named_targets():
        name_a, name_b = tensor_names(path)
        tensors[name_a], tensors[name_b] = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    check_finite(tensors.items(), f"the adapters for {out_dir}")
    cfg = lora.config
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": list(cfg.targets), "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, **_PLAIN_LORA}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def adapter_config(adapter_dir) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory (a ModelError when it is not plain LoRA)."""
    path = Path(adapter_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable adapter config ({e})") from None
    if raw.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type is {raw.get('peft_type')!r}, expected 'LORA'")
    for key, plain in _PLAIN_LORA.items():
        value = raw.get(key)
        unset = value is None or (plain in (None, {}) and not value)  # PEFT writes {} or null alike
        if not unset and value != plain:
            raise ModelError(f"{path}: {key}={raw[key]!r} is not supported (expected {plain!r})")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise ModelError(f"{path}: target_modules={targets!r}: expected a list of projection names")
    try:
        return LoRAConfig(rank=raw.get("r"), alpha=float(raw.get("lora_alpha")),
                          dropout=float(raw.get("lora_dropout", 0.0)), target_modules=",".join(targets))
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: {e}") from None


def read_adapter_weights(lora: LoRA, adapter_dir) -> LoRA:
    """Copy the adapter directory's tensors into `lora` (every target present, shapes checked);
    returns `lora`."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    expected = set()
    with torch.no_grad():
        for target, a, b in lora.named_targets():
            for name, param in zip(tensor_names(target), (a, b)):
                expected.add(name)
                if name not in tensors:
                    raise ModelError(f"{path}: missing tensor {name!r}")
                if tensors[name].shape != param.shape:
                    raise ModelError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                     f"expected {tuple(param.shape)}")
                param.copy_(tensors[name])
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise ModelError(f"{path}: unexpected tensor {unexpected[0]!r}: not an adapter of this model's "
                         f"projections for target_modules={lora.config.target_modules!r}")
    return lora


def load_adapter(model, adapter_dir) -> LoRA:
    """Freeze `model` and attach the adapters of a PEFT directory (engine/model/lora.py)."""
    return read_adapter_weights(add_lora(model, adapter_config(adapter_dir)), adapter_dir)


def merge_adapter(adapter_dir, base_dir, out_dir, dtype="auto") -> None:
    """Write `base_dir`'s model with `adapter_dir`'s adapters merged into its weights (summed in fp32,
    rounded once into `dtype`, default the base checkpoint's) as a transformers-loadable `out_dir`."""
    model = load_model(base_dir, dtype=dtype)
    load_adapter(model, adapter_dir).merge_()
    save_model(model, out_dir, source_dir=base_dir)

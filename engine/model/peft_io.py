"""LoRA adapters in and out as a PEFT adapter directory, which `peft.PeftModel.from_pretrained`
loads onto the transformers base model:

    adapter_config.json          peft_type LORA, task_type, r, lora_alpha, lora_dropout,
    target_modules,
                                 modules_to_save, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight [r, in] and
                                 .lora_B.weight [out, r] per adapted projection, in the Hugging Face
                                 module paths (a packed q/k/v writes q_proj, k_proj and v_proj), and
                                 base_model.model.score.weight [1, H] for a head trained in full
    reward_offset.json           a reward model's normalization offset (ours; PEFT ignores the file)
    manifest.json                every file's size and sha256 (runs/durable.py; PEFT ignores it)

task_type CAUSAL_LM: adapters on a causal LM (`AutoModelForCausalLM`). task_type SEQ_CLS with
modules_to_save ["score"]: a reward model (or the LoRA critic), adapters plus the fp32 `score` head,
for `AutoModelForSequenceClassification` (num_labels=1) of the base directory.
Reading accepts what this writes and what PEFT writes for plain LoRA; options this engine does not
implement (DoRA, rsLoRA, per-module ranks, bias training) are a one-line ModelError, never ignored.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config.lora import LoRAConfig
from ..runs.durable import check_finite, written_whole
from ..errors import ModelError
from ..runs.run_dir import check_unchanged, claim, entries, release
from ..ranks import sharded, world
from .hf_io import load_model, save_model
from .lora import LoRA, add_lora
from .weight_map import local_box
from .reward_model import load_or_start_reward_model, save_reward_model

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
OFFSET_FILE = "reward_offset.json"
# PEFT's task type -> the heads (modules_to_save) our model of that kind trains in full; PEFT itself
# adds "classifier" to a SEQ_CLS adapter's modules_to_save (a name for other architectures' heads).
TASK_HEADS = {"CAUSAL_LM": (), "SEQ_CLS": ("score",)}
_SEQ_CLS_HEAD_NAMES = {"score", "classifier"}
PREFIX = "base_model.model."
# PEFT options that change the adapters' math: read only at these values.
_PLAIN_LORA = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
               "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
               "lora_bias": False}


def tensor_names(target_path: str) -> tuple[str, str]:
    """PEFT's names of one target's A and B, e.g. for model.layers.0.self_attn.q_proj."""
    return f"{PREFIX}{target_path}.lora_A.weight", f"{PREFIX}{target_path}.lora_B.weight"


def task_type(lora: LoRA) -> str:
    """PEFT's task type of `lora`: SEQ_CLS when it trains a score head, else CAUSAL_LM."""
    heads = tuple(lora.heads)
    for task, names in TASK_HEADS.items():
        if heads == names:
            return task
    raise ValueError(f"adapters with heads {heads}: expected one of {list(TASK_HEADS.values())}")


def head_tensors(lora: LoRA) -> dict[str, torch.Tensor]:
    """PEFT's name of each parameter of the heads trained in full -> the parameter."""
    return {f"{PREFIX}{name}.{key}": param for name, head in lora.heads.items()
            for key, param in head.named_parameters()}


def save_adapter(lora: LoRA, out_dir, base_model: str | None = None,
                 reward_offset: float | None = None) -> None:
    """Write `lora` as a PEFT adapter directory `out_dir`, atomically replacing it (as save_model
    does). `base_model`: the directory or hub id recorded as base_model_name_or_path;
    `reward_offset`: a reward model's normalization offset, written to OFFSET_FILE. Collective under
    torchrun (every rank calls it): tensor-parallel adapters are gathered whole (lora.whole), rank 0
    writes."""
    tensors = {}
    for path, a, b in lora.named_targets():
        name_a, name_b = tensor_names(path)
        tensors[name_a], tensors[name_b] = (sharded.whole_value(p.detach()).cpu().contiguous()
                                            for p in (a, b))
    if not world.is_main():
        return
    tensors.update({name: p.detach().cpu().contiguous() for name, p in head_tensors(lora).items()})
    check_finite(tensors.items(), f"the adapters for {out_dir}")
    cfg = lora.config
    config = {"peft_type": "LORA", "task_type": task_type(lora),
              "base_model_name_or_path": base_model,
              "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
              "target_modules": list(cfg.targets), "init_lora_weights": True,
              "inference_mode": True,
              "modules_to_save": list(lora.heads) or None, **_PLAIN_LORA}
    if reward_offset is not None:
        check_finite([("reward_offset", torch.tensor(reward_offset))],
                     f"the adapters for {out_dir}")
    with written_whole(out_dir) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if reward_offset is not None:
            (tmp / OFFSET_FILE).write_text(json.dumps({"reward_offset": reward_offset}) + "\n")


def _raw_config(adapter_dir) -> tuple[Path, dict]:
    path = Path(adapter_dir) / CONFIG_FILE
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable adapter config ({e})") from None


def adapter_heads(adapter_dir) -> tuple[str, ...]:
    """The heads a PEFT adapter directory trains in full: ("score",) for SEQ_CLS, () for CAUSAL_LM
    (a ModelError for another task type or other modules_to_save)."""
    path, raw = _raw_config(adapter_dir)
    task, saved = raw.get("task_type") or "CAUSAL_LM", set(raw.get("modules_to_save") or ())
    if task not in TASK_HEADS:
        raise ModelError(
            f"{path}: task_type={task!r} is not supported (expected one of {list(TASK_HEADS)})")
    allowed = _SEQ_CLS_HEAD_NAMES if task == "SEQ_CLS" else set()
    if not saved <= allowed:
        raise ModelError(
            f"{path}: modules_to_save={raw['modules_to_save']!r} is not supported for task_type "
            f"{task} (expected {sorted(allowed) or None})")
    return TASK_HEADS[task]


def adapter_config(adapter_dir) -> LoRAConfig:
    """The LoRAConfig of a PEFT adapter directory (a ModelError when it is not plain LoRA)."""
    path, raw = _raw_config(adapter_dir)
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
                          dropout=float(raw.get("lora_dropout", 0.0)),
                          target_modules=",".join(targets))
    except (TypeError, ValueError) as e:
        raise ModelError(f"{path}: {e}") from None


def read_adapter_weights(lora: LoRA, adapter_dir) -> LoRA:
    """Copy the adapter directory's tensors into `lora` (every target and head present, shapes
    checked); returns `lora`."""
    path = Path(adapter_dir) / WEIGHTS_FILE
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    params = {name: param for target, a, b in lora.named_targets()
              for name, param in zip(tensor_names(target), (a, b))}
    params.update(head_tensors(lora))
    with torch.no_grad():
        for name, param in params.items():
            if name not in tensors:
                raise ModelError(f"{path}: missing tensor {name!r}")
            if tensors[name].shape != param.shape:
                raise ModelError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                                 f"expected {tuple(param.shape)}")
            local, offsets = local_box(param)  # a tensor-parallel adapter takes its slice
            local.copy_(tensors[name][tuple(slice(o, o + n) for o, n in zip(offsets, local.shape))])
    unexpected = sorted(set(tensors) - set(params))
    if unexpected:
        raise ModelError(
            f"{path}: unexpected tensor {unexpected[0]!r}: not an adapter of this model's "
            f"projections for target_modules={lora.config.target_modules!r}")
    return lora


def load_adapter(model, adapter_dir) -> LoRA:
    """Freeze `model` and attach the adapters of a PEFT directory (engine/model/lora.py); a SEQ_CLS
    adapter also fills the model's `score` head (a reward model)."""
    names = adapter_heads(adapter_dir)
    missing = [name for name in names if not hasattr(model, name)]
    if missing:
        raise ModelError(
            f"{adapter_dir}: a sequence-classification adapter (modules_to_save {list(names)}) "
            f"needs a reward model, got a {type(model).__name__} without {missing[0]!r}")
    lora = add_lora(model, adapter_config(adapter_dir),
                    {name: getattr(model, name) for name in names})
    return read_adapter_weights(lora, adapter_dir)


def read_reward_offset(adapter_dir) -> float | None:
    """The reward offset saved with a reward model's adapters, None when there is none."""
    path = Path(adapter_dir) / OFFSET_FILE
    if not path.exists():
        return None
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["reward_offset"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: not a readable reward offset ({e})") from None


def merge_adapter(adapter_dir, base_dir, out_dir, dtype="auto", overwrite: bool = False) -> None:
    """Write `base_dir`'s model with `adapter_dir`'s adapters merged into its weights (summed in
    fp32, rounded once into `dtype`, default the base checkpoint's) as a transformers-loadable
    `out_dir`: a causal LM, or for a SEQ_CLS adapter a reward model (engine/model/reward_model.py)
    with the adapter's score head and its reward offset (else the base's). The base of a SEQ_CLS
    adapter is a causal LM (a reward model run's) or a reward model (the LoRA critic's: the merge is
    then the critic as a sequence classifier, its value head as the score head).
    `out_dir` must be new, empty, or an earlier export (replaced only with `overwrite`); never an
    input or a directory holding one (runs/run_dir.py). It is locked like a run directory while
    the export is written beside it, and looked at again before the rename: anything that appeared
    in it meanwhile stops the export, with nothing replaced. The export is marked as one."""
    out_dir = os.path.realpath(out_dir)
    claim(out_dir, "export", overwrite=overwrite, inputs=[adapter_dir, base_dir], option="--out",
          overwrite_option="--overwrite", empty=False)
    try:
        # Held under its lock; what is there now is replaced whole, and nothing else may appear
        # meanwhile.
        recheck = functools.partial(check_unchanged, out_dir, entries(out_dir), "--out")
        if not adapter_heads(adapter_dir):
            model = load_model(base_dir, dtype=dtype)
            load_adapter(model, adapter_dir).merge_()
            save_model(model, out_dir, source_dir=base_dir, kind="export", before_rename=recheck)
            return
        model = load_or_start_reward_model(base_dir, dtype=dtype)
        load_adapter(model, adapter_dir).merge_()
        offset = read_reward_offset(adapter_dir)
        model.reward_offset = model.reward_offset if offset is None else offset
        save_reward_model(model, out_dir, source_dir=base_dir, kind="export", before_rename=recheck)
    finally:
        release(out_dir)

"""Hugging Face model directories in and out: config.json + safetensors (single file or sharded).

Saving writes a complete directory (config, weights, tokenizer and generation files copied from the
source, and a manifest of every file's size and sha256, engine/durable.py) into a temporary sibling,
fsyncs it and renames it into place, so a reader never sees half a checkpoint; a model with a NaN or
inf anywhere is refused before anything is written, and the directory gets the usual modes (0644
files, 0755 directories under the default umask) so others can read it.
Loading turns a missing, corrupt or truncated weight file, a sharded index naming a file outside the
directory, tensors that do not fit the config and an unsupported architecture into a one-line
`ModelError` naming the file. transformers is never asked to run code shipped with a model
(trust_remote_code=False), so it never asks on stdin either.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoConfig

from ..errors import ConfigValueError, ModelError
from ..durable import check_finite, written_whole
from ..run_dir import write_marker
from ..path_checks import CONFIG_FILE
from .config import ModelConfig
from .causal_lm import CausalLM, PackedProjection
from .moe_io import packed_tensors, per_expert_tensors

try:  # what transformers' validated configs raise for a bad config.json value (newer huggingface_hub)
    from huggingface_hub.errors import StrictDataclassError as _ConfigValidationError
except ImportError:
    _ConfigValidationError = ValueError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Tensors some checkpoints carry that the decoder recomputes (RoPE frequencies).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Non-weight files copied along when saving, so the saved directory is complete for transformers.
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
               "added_tokens.json", "chat_template.jinja")


def load_config(model_dir) -> ModelConfig:
    """Read and validate `model_dir/config.json` (a ModelError when it is missing, unreadable or
    describes an architecture the decoder does not implement)."""
    path = Path(model_dir) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        model_type, architectures = raw.get("model_type"), raw.get("architectures")
    except (OSError, ValueError, AttributeError, RecursionError) as e:  # RecursionError: JSON nested too deeply
        raise ModelError(f"{path}: not a readable model config ({e})") from None
    try:
        # Checked before transformers reads it: an unknown model_type is a page of text there.
        ModelConfig.check_model_type(model_type, architectures)
        return ModelConfig.from_hf(AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False))
    except (ValueError, _ConfigValidationError) as e:
        raise ModelError(f"{model_dir}: {e}") from None


def load_tokenizer(model_dir):
    """The tokenizer of `model_dir`, by transformers' AutoTokenizer without running any code the
    directory ships (a tokenizer that needs its own code is a ModelError)."""
    from transformers import AutoTokenizer  # deferred: only the stages and the engine need it

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except ValueError as e:
        raise ModelError(f"{model_dir}: its tokenizer cannot be loaded without running code from the directory, "
                         f"which fusedrl never does ({' '.join(str(e).split())})") from None


def resolve_dtype(dtype, config: ModelConfig) -> torch.dtype:
    """'auto' (the checkpoint's dtype, fp32 if it names none), a torch dtype, or its name."""
    if dtype in (None, "auto"):
        return config.torch_dtype or torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ConfigValueError(f"dtype {dtype!r} is not supported; use one of {sorted(names)} or 'auto'")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype


def load_model(model_dir, dtype="auto", device="cpu", model_cls=CausalLM) -> CausalLM:
    """Build the decoder described by `model_dir` and fill it with the directory's weights.

    `model_cls`: CausalLM or a subclass with extra parameters (the reward model's `score` head).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: no such model directory")
    config = load_config(model_dir)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):  # no random init: every parameter is overwritten from the checkpoint
        model = model_cls(config, dtype)
    model.to_empty(device=device)
    model.tie_weights()
    expected = hf_tensors(model)
    packed = packed_tensors(model)  # MoE experts stored packed: one tensor stands for many names
    seen = set()
    for path, names in _weight_files(model_dir).items():
        with _open_weights(path) as f:
            for name in names:
                if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
                    continue
                if name not in expected and name not in packed:
                    raise ModelError(f"unexpected tensor {name!r} in {path.name}: not a parameter of a "
                                     f"{config.model_type} decoder with this config")
                tensor = _read_tensor(f, name, path)
                param = expected[name] if name in expected else packed[name][0]
                if tensor.shape != param.shape:
                    raise ModelError(f"tensor {name!r} in {path.name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor)
                seen.update(packed[name][1] if name in packed else (name,))
    missing = sorted(set(expected) - seen)
    if missing:
        raise ModelError(f"missing tensor {missing[0]!r} in {model_dir}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return model


def hf_tensors(model: CausalLM) -> dict[str, torch.Tensor]:
    """Hugging Face tensor name -> the parameter it names, or for the parts of a packed projection
    (q/k/v, gate/up) the row block of the packed weight or bias (a view: copying into it loads the
    part; MoE experts by their per-expert names, moe_io.py). The tied LM head appears once, as the
    embedding."""
    packed = {name: module for name, module in model.named_modules() if isinstance(module, PackedProjection)}
    tensors = {}
    for name, param in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner not in packed:
            tensors[name] = param
            continue
        parent, start = owner.rpartition(".")[0], 0
        for part, size in packed[owner].parts:
            tensors[f"{parent}.{part}.{leaf}"] = param[start:start + size]
            start += size
    return per_expert_tensors(model, tensors)


def _open_weights(path: Path):
    """safe_open, with a missing, truncated or corrupt file as a ModelError naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None


def _read_tensor(f, name: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError) as e:  # e.g. a file cut short after its header
        raise ModelError(f"{path}: tensor {name!r} cannot be read ({e})") from None


def _weight_files(model_dir: Path) -> dict[Path, list[str]]:
    """file -> tensor names, from the sharded index or the single safetensors file."""
    index = model_dir / INDEX_FILE
    if index.exists():
        files: dict[Path, list[str]] = {}
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise ModelError(f"{index}: not a readable safetensors index ({e})") from None
        for name, file in weight_map.items():
            files.setdefault(_shard_path(model_dir, index, file), []).append(name)
        return files
    single = model_dir / SINGLE_FILE
    if not single.exists():
        raise ModelError(f"{model_dir}: no weights ({SINGLE_FILE} or {INDEX_FILE})")
    with _open_weights(single) as f:
        return {single: list(f.keys())}


def _shard_path(model_dir: Path, index: Path, file) -> Path:
    """The shard an index's weight_map names: a plain file name in `model_dir`, never a path (which
    could lead out of it; a link in the directory, as the Hugging Face cache makes, is followed)."""
    if not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file or "\\" in file:
        raise ModelError(f"{index}: weight_map names {file!r}: expected the name of a file in the model directory")
    return model_dir / file


def save_model(model: CausalLM, out_dir, source_dir=None, max_shard_bytes: int = 5 * 2**30, kind=None):
    """Write `model` as a transformers-loadable directory, atomically replacing `out_dir`.

    Tokenizer and generation files are copied from `source_dir` when given. Weights above
    `max_shard_bytes` are split into shards with an index, as `save_pretrained` does. A NaN or inf
    in any parameter raises NonFiniteError before anything is written. `kind`: mark the directory
    as the output of that fusedrl command (engine/run_dir.py), so the command may replace it later.
    """
    check_finite(model.named_parameters(), f"the model for {out_dir}")
    with written_whole(out_dir) as tmp:
        _write_dir(model, tmp, source_dir, max_shard_bytes)
        if kind is not None:
            write_marker(tmp, kind)


def _write_dir(model: CausalLM, tmp: Path, source_dir, max_shard_bytes: int):
    hf_config = copy.deepcopy(model.config.hf_config)
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    # transformers 5 calls the field `dtype`, 4.x `torch_dtype`.
    setattr(hf_config, "dtype" if "dtype" in hf_config.to_dict() else "torch_dtype", dtype_name)
    hf_config.save_pretrained(str(tmp))
    tensors = {name: _owned_cpu_copy(t) for name, t in hf_tensors(model).items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    shards = _shard(tensors, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / file), metadata=metadata)
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for name in _SIDE_FILES if source_dir else ():
        src = Path(source_dir) / name
        if src.exists():
            shutil.copy2(src, tmp / name)


def _owned_cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU, detached, owning its storage: safetensors refuses tensors that share memory, as
    the row blocks of a packed projection do (only those are copied on a CPU model)."""
    t = t.detach().to("cpu")
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _shard(tensors: dict, max_bytes: int) -> list[dict]:
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards

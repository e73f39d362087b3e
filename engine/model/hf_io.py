"""Hugging Face model directories in and out: config.json + safetensors (single file or sharded).

Saving writes a complete directory (config, weights, tokenizer and generation files copied from the
source, and a manifest of every file's size and sha256, runs/durable.py) into a temporary sibling,
fsyncs it and renames it into place, so a reader never sees half a checkpoint; a model with a NaN or
inf anywhere is refused before anything is written, and the directory gets the usual modes (0644
files, 0755 directories under the default umask) so others can read it. Under torchrun saving is
collective: rank 0 writes while the ranks gather one parameter at a time (streamed_save.py).
Loading may shard the model on the meta device first; each rank then reads only the slices of its
shards (weight_map.py), and one process reads whole tensors by the same code. Loading turns a
missing, corrupt or truncated weight file, a sharded index naming a file outside the directory,
tensors that do not fit the config and an unsupported architecture into a one-line `ModelError`
naming the file. transformers is never asked to run code shipped with a model
(trust_remote_code=False), so it never asks on stdin either.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ConfigValueError, ModelError
from ..ranks import sharded, world
from ..runs.durable import written_whole
from ..runs.run_dir import write_marker
from ..runs.path_checks import CONFIG_FILE
from .config import ModelConfig
from .footprint import refuse_unfit_weights
from .causal_lm import CausalLM
from .vision_language import vision_variant
from .streamed_save import INDEX_FILE, SINGLE_FILE, check_finite_shards, write_weights
from .weight_map import hf_blocks, hf_shape, local_box, overlap, packed_blocks

# what transformers' validated configs raise for a bad config.json value (newer huggingface_hub)
try:
    from huggingface_hub.errors import StrictDataclassError as _ConfigValidationError
except ImportError:
    _ConfigValidationError = ValueError

# Tensors some checkpoints carry that the decoder recomputes (RoPE frequencies).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# The tokenizer's reserved vision token the sampler masks with the model's four (VisionSpec).
VISION_PAD = "<|vision_pad|>"
# Checkpoint name prefixes transformers 5 writes for a vision-language model -> the model's own
# (the Hub's Qwen2.5-VL layout: `model.layers.*`, `visual.*`), read in either layout. Saving writes
# the layout transformers' save_pretrained writes for the family (qwen3_vl: its own prefixes; the
# version installed loads a Qwen3-VL checkpoint only in those).
_VISION_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))
_PREFIXED_FAMILIES = ("qwen3_vl",)
# Non-weight files copied along when saving, so the saved directory is complete for transformers.
_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
               "added_tokens.json", "chat_template.jinja", "preprocessor_config.json",
               "processor_config.json", "video_preprocessor_config.json")


def load_config(model_dir) -> ModelConfig:
    """Read and validate `model_dir/config.json` (a ModelError when it is missing, unreadable or
    describes an architecture the decoder does not implement)."""
    path = Path(model_dir) / CONFIG_FILE
    _check_regular(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        model_type, architectures = raw.get("model_type"), raw.get("architectures")
    # RecursionError: JSON nested too deeply
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise ModelError(f"{path}: not a readable model config ({e})") from None
    try:
        # Checked before transformers reads it: an unknown model_type is a page of text there.
        ModelConfig.check_model_type(model_type, architectures)
        ModelConfig.check_present(raw)
        ModelConfig.check_depth(raw)
        # Imported here, not with the module: transformers' first model import lists every
        # architecture it ships (a quarter of a second on a quiet core), which a process that
        # imports the stages but reads no config.json (a rank's script that only takes a lock,
        # an in-memory model's run) would pay for nothing.
        from transformers import AutoConfig

        config = ModelConfig.from_hf(
            AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False))
    except (ValueError, _ConfigValidationError) as e:
        raise ModelError(f"{model_dir}: {e}") from None
    if config.vision is not None:
        pad = _added_token_id(Path(model_dir), VISION_PAD)
        if pad is not None and 0 <= pad < config.vocab_size:
            config.vision = dataclasses.replace(config.vision, vision_pad_token_id=pad)
    return config


def _added_token_id(model_dir: Path, content: str) -> int | None:
    """The id of the added token `content` in model_dir/tokenizer.json, None when the directory
    has no readable tokenizer.json or the token is not one of its added tokens."""
    try:
        added = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        ids = [t["id"] for t in added.get("added_tokens", ()) if t.get("content") == content]
    except (OSError, ValueError, AttributeError, TypeError, KeyError, RecursionError):
        return None
    return ids[0] if ids and isinstance(ids[0], int) else None


TOKENIZER_PROBE = "hello world 0123456789"  # letters, digits, a space: a real vocabulary has some


def tokenizer_encodes(tokenizer) -> bool:
    """Whether `tokenizer` turns text into tokens: TOKENIZER_PROBE, or else a few words of its own
    vocabulary (a word-level vocabulary without an unknown token encodes nothing else)."""
    def encodes(text: str) -> bool:
        try:
            return bool(text) and bool(tokenizer(text, add_special_tokens=False)["input_ids"])
        except Exception:  # noqa: BLE001 - the tokenizers library raises its own Exception
            return False
    if encodes(TOKENIZER_PROBE):
        return True
    words = [w for w in list(tokenizer.get_vocab())[:64] if w.isalnum()][:4]
    return encodes(" ".join(words))


def load_tokenizer(model_dir):
    """The tokenizer of `model_dir`, by transformers' AutoTokenizer without running any code the
    directory ships (a tokenizer that needs its own code is a ModelError). Where AutoTokenizer's
    choice encodes nothing, the directory's tokenizer.json as saved: for some model types
    (Qwen2) it takes the type's own class over a saved generic one, which reads a word-level
    tokenizer.json as a byte-level BPE with no vocabulary."""
    from transformers import AutoTokenizer  # deferred: only the stages and the engine need it

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except ValueError as e:
        why = " ".join(str(e).split())
        if "trust_remote_code" in why:
            raise ModelError(
                f"{model_dir}: its tokenizer cannot be loaded without running code from the "
                f"directory, which fusedrl never does ({why})") from None
        # a corrupt or cut tokenizer file, a class transformers does not know
        raise ModelError(f"{model_dir}: its tokenizer cannot be loaded ({why})") from None
    if tokenizer_encodes(tokenizer) or not (Path(model_dir) / "tokenizer.json").is_file():
        return tokenizer
    from transformers import PreTrainedTokenizerFast
    try:
        saved = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    except Exception:  # noqa: BLE001 - a tokenizer.json the tokenizers library cannot read
        return tokenizer
    return saved if tokenizer_encodes(saved) else tokenizer


def resolve_dtype(dtype, config: ModelConfig) -> torch.dtype:
    """'auto' (the checkpoint's dtype, fp32 if it names none), a torch dtype, or its name."""
    if dtype in (None, "auto"):
        return config.torch_dtype or torch.float32
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ConfigValueError(
                f"dtype {dtype!r} is not supported; use one of {sorted(names)} or 'auto'")
        return names[dtype]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
    return dtype


def load_model(model_dir, dtype="auto", device="cpu", model_cls=CausalLM,
               shard: Optional[Callable] = None, renames: Optional[dict] = None,
               fresh=()) -> CausalLM:
    """Build the decoder described by `model_dir` and fill it with the directory's weights.

    `model_cls`: CausalLM or a subclass with extra parameters (the reward model's `score` head);
    for a vision-language config its vision variant (vision_language.vision_variant).
    `shard(model)`: shards the model in place while it is still on the meta device (e.g. FSDP2's
    fully_shard through distributed.shard); each rank then allocates and reads from the
    safetensors files (mmap) only the rows and columns of its own shards, so no rank ever holds a
    whole model. Without it (one process) the same code fills whole tensors.
    `renames`: {checkpoint name: parameter name} (a reward model's score.weight as a critic's
    value_head.weight); `fresh`: parameters the checkpoint does not hold, started at zero (a new
    score or value head).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: no such model directory")
    config = load_config(model_dir)
    if config.vision is not None:  # the decoder with the tower, the class's heads on it
        model_cls = vision_variant(model_cls)
    dtype = resolve_dtype(dtype, config)
    ranks = world.world_size() if shard is not None else 1
    refuse_unfit_weights(config, dtype, device, model_dir, ranks)
    with torch.device("meta"):  # no random init: every parameter is overwritten from the checkpoint
        model = model_cls(config, dtype)
    if shard is not None:
        shard(model)
    # FSDP2's CPU offload (distributed.shard(offload=True)) wants the shards materialized in CPU
    # memory.
    model.to_empty(device="cpu" if model.offloaded else device)
    model.tie_weights()
    expected = hf_blocks(model)
    packed = packed_blocks(model)  # MoE experts stored packed: one tensor stands for many names
    for name in fresh:
        for block in expected.pop(name):
            with torch.no_grad():
                local_box(block.param)[0].zero_()
    renames = renames or {}
    seen = set()
    for path, names in _weight_files(model_dir).items():
        with _open_weights(path) as f:
            for name in names:
                if (name.endswith(_IGNORED_SUFFIXES)
                    or (name == "lm_head.weight" and config.tie_word_embeddings)):
                    continue
                target = renames.get(name, name)
                if config.vision is not None:
                    target = _vision_name(target)
                if target not in expected and target not in packed:
                    raise ModelError(
                        f"unexpected tensor {name!r} in {path.name}: not a parameter of a "
                        f"{config.model_type} decoder with this config{_head_hint(name)}")
                blocks, names_filled = ((expected[target], (target,)) if target in expected
                                        else packed[target])
                _fill(f, name, path, blocks)
                seen.update(names_filled)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ModelError(f"missing tensor {missing[0]!r} in {model_dir}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                         + _head_hint(missing[0], missing=True))
    return model


# The scalar heads a checkpoint's tensor names tell apart: what each directory is, for an error
# that says a model was given where another kind was expected.
_HEADS = {"score.weight": "a reward model (`fusedrl rm`: a score head)",
          "value_head.weight": "a critic (a value head)"}


def _head_hint(name: str, missing: bool = False) -> str:
    """A clause naming what a directory is (or is not) by a scalar head's tensor, else ""."""
    if name not in _HEADS:
        return ""
    if missing:
        return f": the directory is not {_HEADS[name]}"
    return f": the directory is {_HEADS[name]}, not a plain decoder"


@torch.no_grad()
def _fill(f, name: str, path: Path, blocks: list) -> None:
    """Copy the rows and columns of checkpoint tensor `name` that this rank's shards hold (all of
    it in one process) into them, reading only those from the file."""
    try:
        view = f.get_slice(name)
        shape = tuple(view.get_shape())
        if shape != hf_shape(blocks):
            raise ModelError(
                f"tensor {name!r} in {path.name} has shape {shape}, expected {hf_shape(blocks)}")
        for block in blocks:
            local, offsets = local_box(block.param)
            found = overlap(block, offsets, local.shape)
            if found is not None:
                source, target = found
                local[target].copy_(view[source])
    except (SafetensorError, OSError) as e:  # e.g. a file cut short after its header
        raise ModelError(f"{path}: tensor {name!r} cannot be read ({e})") from None


def _vision_name(name: str) -> str:
    """A vision-language checkpoint's tensor name as the model's parameter name."""
    for prefix, ours in _VISION_PREFIXES:
        if name.startswith(prefix):
            return ours + name[len(prefix):]
    return name


def prefixed_name(name: str) -> str:
    """A vision-language model's parameter name as transformers 5 writes it (and names it in
    memory: model.language_model.*, model.visual.*)."""
    for prefix, ours in _VISION_PREFIXES:
        if name.startswith(ours):
            return prefix + name[len(ours):]
    return name


def _check_regular(path: Path) -> None:
    """ModelError when `path` exists but is not a regular file (a FIFO or a device would block or
    never end; links to regular files, as the Hugging Face cache makes, are fine)."""
    if path.exists() and not path.is_file():
        raise ModelError(f"{path}: not a regular file (a directory, FIFO or device); expected a "
                         "model file")


def _open_weights(path: Path):
    """safe_open, with a missing, truncated or corrupt file, or one that is not a regular file, as
    a ModelError naming it."""
    _check_regular(path)
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None


def _weight_files(model_dir: Path) -> dict[Path, list[str]]:
    """file -> tensor names, from the sharded index or the single safetensors file."""
    index = model_dir / INDEX_FILE
    if index.exists():
        files: dict[Path, list[str]] = {}
        _check_regular(index)
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
    if (not isinstance(file, str) or file in ("", ".", "..") or Path(file).name != file or
        "\\" in file):
        raise ModelError(
            f"{index}: weight_map names {file!r}: expected the name of a file in the model "
            "directory")
    return model_dir / file


def save_model(model: CausalLM, out_dir, source_dir=None, max_shard_bytes: int = 5 * 2**30,
               kind=None, before_rename: Optional[Callable[[], None]] = None):
    """Write `model` as a transformers-loadable directory, atomically replacing `out_dir`.

    Tokenizer and generation files are copied from `source_dir` when given. Weights above
    `max_shard_bytes` are split into shards with an index, as `save_pretrained` does. A NaN or inf
    in any parameter raises NonFiniteError before anything is written. `kind`: mark the directory
    as the output of that fusedrl command (runs/run_dir.py), so the command may replace it later.
    `before_rename()`: a last check of `out_dir` before the written directory replaces it
    (export's).
    Collective under torchrun (every rank calls it; rank 0 writes, one parameter gathered at a time:
    engine/model/streamed_save.py); every rank returns once the directory is in place.
    """
    sharded.reshard(model)  # a root FSDP unit left gathered by an eval forward: read its shards
    check_finite_shards(model, f"the model for {out_dir}")
    skip = ("lm_head.weight",) if model.config.tie_word_embeddings else ()
    rename = prefixed_name if model.config.model_type in _PREFIXED_FAMILIES else None
    if not world.is_main():
        write_weights(model, None, max_shard_bytes, skip, rename)
    else:
        with written_whole(out_dir, before_rename) as tmp:
            _write_config(model, tmp)
            write_weights(model, tmp, max_shard_bytes, skip, rename)
            for name in _SIDE_FILES if source_dir else ():
                src = Path(source_dir) / name
                if src.exists():
                    shutil.copy2(src, tmp / name)
            if kind is not None:
                write_marker(tmp, kind)
    world.barrier()


def _write_config(model: CausalLM, tmp: Path) -> None:
    hf_config = copy.deepcopy(model.config.hf_config)
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    # transformers 5 calls the field `dtype`, 4.x `torch_dtype`.
    setattr(hf_config, "dtype" if "dtype" in hf_config.to_dict() else "torch_dtype", dtype_name)
    hf_config.save_pretrained(str(tmp))

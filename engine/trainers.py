"""The engine at TRL's shape: a trainer object per stage, built from a model, our config as `args`,
the data and callbacks, run by `.train()` (docs/python_api.md).

    from fusedrl.engine import GRPOConfig, GRPOTrainer
    trainer = GRPOTrainer(model=hf_model, processing_class=tokenizer, reward_funcs=[acc],
                          args=GRPOConfig(output_dir="runs/grpo"), train_dataset=ds,
                          callbacks=[on_step])
    result = trainer.train()      # TrainResult: final_dir, output_dir, metrics

`model` is a model directory or an in-memory transformers model (with its tokenizer as
`processing_class` unless its directory, `model.name_or_path`, holds one): the in-memory model is
written to a temporary directory for the run (model_directory) and receives the trained weights
when the run ends, as a TRL trainer leaves its model trained.
`args` is a config object, a nested dict or a YAML path; its model option (`model`, PPO's
`policy`) is taken from `model=` when given. Callbacks: engine/train/callbacks.py. Errors are
exceptions (engine/errors.py), never an exit of the process.
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config.distill import DistillConfig
from .config.io import ConfigError, to_dict
from .config.ppo import GRPOConfig, PPOConfig
from .config.train import RMConfig, SFTConfig
from .config.trl_config import is_trl_config, translate
from .data.sources import is_dataset
from .errors import RunComplete, UsageError
from .runs.path_checks import check_input_file
from .train.callbacks import as_callback


@dataclass
class TrainResult:
    """What a finished stage returns."""

    final_dir: Path    # the exported model (RUN_DIR/final): transformers-loadable
    output_dir: Path   # the run directory: config.yaml, metrics.jsonl, checkpoints
    metrics: dict      # the last "train" record of metrics.jsonl (step, loss or score, ...)


def as_config(cls, config, overrides: list[str] = ()):
    """`config` as a `cls`: an instance of it (overrides applied on its values), a nested dict,
    the path of a YAML file, or TRL's GRPOConfig / DistillationConfig (translated field by field,
    config/trl_config.py: the fields ours cannot take refused one line each); a ConfigError (a
    ValueError) naming the bad key otherwise, and one naming ours for another config."""
    if isinstance(config, cls):
        return cls.from_dict(to_dict(config), overrides) if overrides else config
    if is_trl_config(config):
        return cls.from_dict(translate(config, cls.__name__), overrides)
    if isinstance(config, dict):
        return cls.from_dict(config, overrides)
    if isinstance(config, (str, Path)):
        return cls.from_yaml(config, overrides)
    kind = type(config)
    raise ConfigError(f"args: expected fusedrl.engine.{cls.__name__} (or a dict or a YAML file "
                      f"path of its options), got {kind.__module__}.{kind.__qualname__}")


def as_dataset(dataset, argument: str):
    """A trainer's dataset: a datasets.Dataset (or DatasetDict) as given, a list of row dicts
    (TRL's {"prompt": ...}, {"messages": [...]}, ...) as a datasets.Dataset, None as None; a
    UsageError naming `argument` otherwise."""
    if dataset is None or is_dataset(dataset):
        return dataset
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(row, dict)
                                                              for row in dataset):
        import datasets
        import pyarrow
        try:
            return datasets.Dataset.from_list(list(dataset))
        except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError) as e:  # a column of mixed kinds
            raise UsageError(
                f"{argument}: its rows do not make one table: {' '.join(str(e).split())[:200]} "
                "(a column must hold one kind of value in every row: e.g. every prompt a string, "
                "or every prompt a list of messages)") from None
    what = (f"a {type(dataset).__name__} of {len(dataset)} rows"
            if isinstance(dataset, (list, tuple)) else type(dataset).__name__)
    raise UsageError(f"{argument}: expected a datasets.Dataset or a non-empty list of row dicts, "
                     f"got {what}")


def _ready(config, dataset) -> None:
    """The config names its model, and its data unless a dataset is given, and every data file it
    names is there (checked as given, before the run makes its paths absolute: a hub name is said
    as one)."""
    try:
        config.require_model()
    except ValueError as e:
        raise UsageError(f"{e}, or pass model=") from None
    if dataset is None:
        try:
            config.require_data()
        except ValueError as e:
            raise UsageError(f"{e}, or pass dataset= (a trainer's train_dataset=)") from None
    for option, path in config.paths()[1].items():
        if path:
            check_input_file(path, option)


def _trained(train: Callable, *args, **kwargs) -> Path:
    """The final model's directory of `train(*args, **kwargs)`, a stage's entry point; a run found
    complete (engine/train/loop.py: nothing was changed) gives the one it wrote before."""
    try:
        return train(*args, **kwargs)
    except RunComplete as done:
        return done.final


def _result(final_dir, output_dir) -> TrainResult:
    from .train.runlog import read_metrics
    records = [r for r in read_metrics(output_dir) if r.get("kind") == "train"]
    return TrainResult(Path(final_dir), Path(output_dir), records[-1] if records else {})


def _in_memory(model) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "state_dict")


class Trainer:
    """A stage as an object: subclasses name their config class, the config's model option and
    the stage's entry point (`_run`)."""

    config_class: type = SFTConfig
    model_option: str = "model"

    def __init__(self, model=None, args=None, train_dataset=None, eval_dataset=None,
                 callbacks=None, processing_class=None):
        if model is not None and not _in_memory(model) and not isinstance(model, (str, Path)):
            raise UsageError(f"model: expected a model directory or a transformers model, got "
                             f"{type(model).__name__}")
        self.args = self._config(args, None if _in_memory(model) else model)
        self.model, self.processing_class = model, processing_class
        self.train_dataset = as_dataset(train_dataset, "train_dataset")
        self.eval_dataset = as_dataset(eval_dataset, "eval_dataset")
        self.callbacks = []
        for callback in callbacks or ():
            self.add_callback(callback)

    def _config(self, args, model_dir=None):
        """`args` (a config, a nested dict, a YAML path; None: {}) as config_class, its model
        option set to `model_dir` when given (an in-memory model's directory: once train() has
        written it)."""
        args = {} if args is None else args
        if model_dir is None:
            return as_config(self.config_class, args)
        if isinstance(args, self.config_class):
            args = to_dict(args)
        if isinstance(args, dict):
            return self.config_class.from_dict({**args, self.model_option: str(model_dir)})
        return as_config(self.config_class, args, [f"{self.model_option}={model_dir}"])

    def add_callback(self, callback) -> None:
        """One more callback (engine/train/callbacks.py), after the others; a UsageError for
        something that is not one."""
        as_callback(callback, self.args, 0)
        self.callbacks.append(callback)

    def train(self) -> TrainResult:
        """Run the stage to its end (or a callback's stop); returns its TrainResult. An in-memory
        model is trained: it holds the exported weights afterwards."""
        if not _in_memory(self.model):
            return self._train_from(None)
        directory = model_directory(self.args.output_dir)
        try:
            self._save_in_memory(directory)
            result = self._train_from(directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        load_trained(self.model, result.final_dir)
        return result

    def _train_from(self, model_dir) -> TrainResult:
        args = self.args if model_dir is None else self._config(self.args, model_dir)
        _ready(args, self.train_dataset)
        return _result(_trained(self._run, args), args.output_dir)

    def _save_in_memory(self, directory: Path) -> None:
        tokenizer = self.processing_class
        source = Path(str(getattr(self.model, "name_or_path", "") or ""))
        if tokenizer is None:
            if not (source.is_dir() and any(source.glob("tokenizer*"))):
                raise UsageError(
                    f"processing_class: an in-memory model ({type(self.model).__name__}) needs its "
                    "tokenizer: pass processing_class=tokenizer")
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(source)
        self.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        if getattr(self.model.config, "vision_config", None) is not None:
            _add_image_processor(directory, source, type(self.model).__name__)

    def _run(self, args) -> Path:
        raise NotImplementedError


# What a vision-language model's processor writes beside its tokenizer.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json")


def _add_image_processor(directory: Path, source: Path, model_name: str) -> None:
    """An in-memory vision-language model's image processor into its run's `directory`: its
    processing_class's (already saved there: a processor), else the files of the directory it was
    loaded from; a UsageError when neither has one (its rows' images could not be read)."""
    if (directory / PROCESSOR_FILES[0]).is_file():
        return
    if not (source.is_dir() and (source / PROCESSOR_FILES[0]).is_file()):
        raise UsageError(
            f"processing_class: an in-memory vision-language model ({model_name}) needs its image "
            "processor to read its rows' images: pass processing_class=processor (the model's "
            "processor, or fusedrl's VisionProcessor), not its tokenizer alone")
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, directory / name)


def model_directory(output_dir) -> Path:
    """Where an in-memory model is written for the run into `output_dir`: a temporary directory
    named after the run's, so that a resumed run (which refuses another model path) finds the same
    path; emptied first."""
    digest = hashlib.sha256(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / f"fusedrl-model-{digest}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    return directory


def load_trained(model, final_dir: Path) -> None:
    """Copy the weights of exported directory `final_dir` into the in-memory transformers `model`
    (each cast to its parameter's dtype); a tied weight, saved once, may be missing."""
    from safetensors.torch import load_file

    from .model.hf_io import prefixed_name
    state = {}
    for path in sorted(Path(final_dir).glob("*.safetensors")):
        state.update(load_file(path))
    # A vision-language export holds the Hub's names (model.*, visual.*); transformers 5 names the
    # in-memory model's model.language_model.*, model.visual.*.
    names = set(model.state_dict())
    state = {name if name in names else prefixed_name(name): t for name, t in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    if getattr(model.config, "tie_word_embeddings", False):
        tied.add("lm_head.weight")
    if unexpected or set(missing) - tied:
        raise UsageError(f"model: the trained weights in {final_dir} do not fit "
                         f"{type(model).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


class SFTTrainer(Trainer):
    """Supervised fine-tuning (SFTConfig; engine/stages/sft.py)."""

    config_class, model_option = SFTConfig, "model"

    def _run(self, args) -> Path:
        from .stages.sft import train_sft
        return train_sft(args, self.train_dataset, self.eval_dataset, self.callbacks)


class RewardTrainer(Trainer):
    """A reward model (RMConfig; engine/stages/rm.py) on preference pairs."""

    config_class, model_option = RMConfig, "model"

    def _run(self, args) -> Path:
        from .stages.rm import train_rm
        return train_rm(args, self.train_dataset, self.eval_dataset, self.callbacks)


class PPOTrainer(Trainer):
    """PPO (PPOConfig; engine/stages/ppo/): the policy is `model`; scored by args.reward_model or
    `reward_funcs` (a function or a list of them, docs/rewards.md), one step per iteration.
    eval_dataset is not read (PPO evaluates on its own rollouts)."""

    config_class, model_option = PPOConfig, "policy"

    def __init__(self, model=None, reward_funcs=None, args=None, train_dataset=None,
                 eval_dataset=None, callbacks=None, processing_class=None):
        super().__init__(model, args, train_dataset, eval_dataset, callbacks, processing_class)
        self.reward_funcs = reward_funcs

    def _run(self, args) -> Path:
        from .stages.ppo.trainer import train_ppo
        return train_ppo(args, reward_fn=self.reward_funcs, dataset=self.train_dataset,
                         callbacks=self.callbacks)


class GRPOTrainer(PPOTrainer):
    """GRPO (GRPOConfig): PPOTrainer with GRPO's defaults (group advantages, no critic)."""

    config_class = GRPOConfig


class DistillTrainer(PPOTrainer):
    """On-policy distillation (DistillConfig; engine/stages/distill/): the student is `model`, the
    teacher args.teacher (TRL's DistillationConfig: teacher_model_name_or_path); `reward_funcs`
    are read with distill.reward_coef > 0."""

    config_class = DistillConfig

    def _run(self, args) -> Path:
        from .stages.distill.trainer import train_distill
        return train_distill(args, reward_fn=self.reward_funcs, dataset=self.train_dataset,
                             callbacks=self.callbacks)

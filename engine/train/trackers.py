"""Experiment trackers (train.report_to): TensorBoard, Weights & Biases and MLflow, each through its
own library (installed as an extra: `pip install 'fusedrl[wandb]'`), fed the records the run writes
to metrics.jsonl as `KIND/NAME` scalars (train/loss, eval/accuracy) at their step.

`check_installed` runs before anything is created (the command line calls it before importing
torch, `start_run` before taking the output directory), so a missing package is one line and no
run directory. Each library reads its own settings from its usual environment variables
(WANDB_PROJECT, WANDB_MODE=offline, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, ...).
Torch-free until a TensorBoard writer opens.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

from ..config.resume import flat_options
from ..errors import UsageError

# report_to name -> (the module it needs, the extra that installs it)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow")}


def tracker_names(options) -> list[str]:
    """The trackers a run's `train` section asks for: train.report_to, plus tensorboard for the
    older train.tensorboard=true; none for report_to=none."""
    names = [n for n in options.report_to if n != "none"]
    if options.tensorboard and "tensorboard" not in names:
        names.append("tensorboard")
    return names


def check_installed(names: list[str], option: str = "train.report_to") -> None:
    """UsageError naming the first tracker in `names` whose package is not installed."""
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise UsageError(f"{option}={name} needs the {module} package, which is not installed: "
                             f"pip install 'fusedrl[{extra}]' (or drop {name} from {option})")


def scalars(kind: str, metrics: dict) -> dict[str, float]:
    """{KIND/NAME: value} of the finite numbers among a record's metrics (no lists, no texts)."""
    return {f"{kind}/{k}": float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoard:
    """Event files in RUN_DIR/tensorboard (torch.utils.tensorboard's writer)."""

    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandB:
    """A Weights & Biases run named after the run directory, its files under RUN_DIR/wandb; the
    resolved config as the run's config."""

    def __init__(self, run_dir: Path, config: dict):
        wandb = importlib.import_module("wandb")
        self._run = wandb.init(name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class MLflow:
    """An MLflow run named after the run directory, the resolved config's options as its params."""

    def __init__(self, run_dir: Path, config: dict):
        self._mlflow = importlib.import_module("mlflow")
        self._mlflow.start_run(run_name=run_dir.name)
        self._mlflow.log_params(flat_options(config))

    def log(self, step: int, values: dict[str, float]) -> None:
        self._mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


WRITERS = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


class Trackers:
    """The run's trackers together: `log` sends a record's scalars to each, `close` ends each."""

    def __init__(self, names: list[str], run_dir: Path, config: dict):
        check_installed(names)
        self._writers = []
        try:
            for name in names:
                self._writers.append(WRITERS[name](Path(run_dir), config))
        except BaseException:
            self.close()
            raise

    def log(self, kind: str, step: int, metrics: dict) -> None:
        values = scalars(kind, metrics)
        if values:
            for writer in self._writers:
                writer.log(step, values)

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []

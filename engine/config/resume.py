"""Which options a resumed run may change: the new command's config against the run's config.yaml.

A resumed run continues what its checkpoint holds: the weights, optimizer moments, data position and
loop state were made under the saved options. Some options only shape what comes next and are read
afresh at every step: those in APPLIED_ON_RESUME take their new value (config.yaml then records it).
Every other option (the models and data, the seed, LoRA, batch and rollout shapes, precision, the
optimizer's betas, eps and weight decay, which live in the checkpoint's optimizer state, the KL
coefficient the checkpoint carries) is refused with one line naming it and both values. Torch-free.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import ConfigValueError
from ..runs.run_paths import path_options
from . import io as config_io

SAVED_CONFIG = "config.yaml"
# The run log's metrics (engine/train/runlog.py): a run directory holds it, checkpoints moved in
# alone do not.
METRICS_FILE = "metrics.jsonl"

APPLIED_ON_RESUME = frozenset({
    # where the run is (a moved run directory) and the loop: its length, cadence, logging, limits
    "output_dir", "train.iterations", "train.epochs", "train.max_steps", "train.eval_every",
    "train.log_every",
    "train.save_every", "train.save_every_minutes", "train.keep_checkpoints",
    "train.max_consecutive_skips",
    "train.resume", "train.resume_without_config", "train.tensorboard", "train.report_to",
    "train.progress", "train.dist_timeout_s", "train.device",
    "train.gradient_checkpointing",
    # the schedule: its peak (the new one from the saved step on) and shape, and gradient clipping
    "optim.lr", "critic_lr", "optim.warmup_steps", "optim.min_lr_ratio", "optim.max_grad_norm",
    # memory only: the same gradient, computed in other pieces
    "data.tokens_per_microbatch", "ppo.microbatch_size", "ppo.tokens_per_microbatch",
    "rollout.kv_cache_memory",
    "rollout.block_size", "rollout.tokens_per_forward", "rollout.release_kv_pool",
    # how the same step runs: its forwards replayed from CUDA graphs
    "train.cuda_graphs",
    # PPO's sampling, loss and reward settings, read at every iteration
    "rollout.temperature", "rollout.top_k", "rollout.top_p", "rollout.ignore_eos", "rollout.exact",
    "rollout.dynamic_sampling", "rollout.max_sampling_rounds", "rollout.overlong_buffer",
    "rollout.overlong_penalty",
    "ppo.epochs", "ppo.clip_eps", "ppo.clip_eps_high", "ppo.dual_clip", "ppo.agg",
    "ppo.loss_agg_norm",
    "ppo.ratio_level", "ppo.log_ratio_clamp", "ppo.is_mode", "ppo.is_level", "ppo.is_cap",
    "ppo.is_low", "ppo.is_high",
    "ppo.vf_coef", "ppo.vf_clip", "ppo.ent_coef", "ppo.kl_loss_coef", "ppo.gamma", "ppo.lam",
    "ppo.whiten_advantages",
    "ppo.max_approx_kl", "reward.kl_target", "reward.kl_horizon", "reward.kl_estimator",
    "reward.normalize",
    "reward.clip", "reward.kl_ceiling", "reward.fn_timeout_s", "reward.weights", "reward.isolation",
})


def resume_changes(run_dir, config) -> dict[str, tuple]:
    """{option: (saved value, new value)} of the options in APPLIED_ON_RESUME that `config` changes
    from the run saved in `run_dir`; ConfigValueError naming the first other option that differs,
    with both values. An option the saved file lacks (a run from an older version) is not compared.
    Without a readable config.yaml: {} for checkpoints moved in alone, a ConfigValueError for a
    run directory that lost it (it holds the run's metrics.jsonl) unless
    train.resume_without_config."""
    path = Path(run_dir) / SAVED_CONFIG
    try:
        saved = flat_options(config_io.read_yaml(path))
    except (OSError, ValueError) as e:
        if (Path(run_dir) / METRICS_FILE).is_file() and not config.train.resume_without_config:
            reason = "no" if isinstance(e, FileNotFoundError) else "an unreadable"
            raise ConfigValueError(
                f"output_dir={run_dir} holds checkpoints but {reason} {SAVED_CONFIG}: the options "
                "they were trained with cannot be compared with this run's; put "
                f"{SAVED_CONFIG} back, or pass train.resume_without_config=true to resume on this "
                "command's options") from None
        return {}
    # Through YAML as config.yaml went, so both sides hold the same types (tuples, floats).
    new = flat_options(yaml.safe_load(config_io.to_yaml(config)))
    paths = path_options(config)
    changed = {key: (saved[key], value) for key, value in new.items()
               if key in saved and saved[key] != value
               and not (key in paths and _same_path(saved[key], value))}
    refused = [key for key in changed if key not in APPLIED_ON_RESUME]
    if refused:
        key, (before, after) = refused[0], changed[refused[0]]
        more = f" (also changed: {', '.join(refused[1:])})" if refused[1:] else ""
        raise ConfigValueError(
            f"{key}={after!r} but the run in {run_dir} was trained with {key}={before!r} (its "
            f"{SAVED_CONFIG}){more}: "
            "a resumed run cannot change it; set it back, or start the new run in another "
            "output_dir")
    return changed


def _same_path(saved, new) -> bool:
    """Whether a path config.yaml holds names the same file as the run's: a run records its inputs
    as absolute paths (runs/run_paths.py); an older one as given, relative to where it ran."""
    both = isinstance(saved, str) and isinstance(new, str)
    return both and os.path.abspath(saved) == os.path.abspath(new)


def flat_options(data: dict, prefix: str = "") -> dict:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_options(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out

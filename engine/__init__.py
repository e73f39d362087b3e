"""fusedrl.engine: the model, generation and trainers built on `fusedrl.kernels` (see the README).

`run_sft`, `run_rm`, `run_ppo`, `run_grpo` with `SFTConfig`, `RMConfig`, `PPOConfig`, `GRPOConfig`
to train from a program, or their trainer objects `SFTTrainer`, `RewardTrainer`, `PPOTrainer`,
`GRPOTrainer`, `DistillTrainer` (TRL's shape: model, args, datasets, `Callback`s; `args` also
TRL's `GRPOConfig` / `DistillationConfig`, translated; docs/python_api.md);
`LLM(model_dir).generate(prompts, SamplingParams(...))` for generation; `load_model` /
`save_model` for Hugging Face directories; `CausalLM.forward_packed` for the training forward.
The names are loaded on first use, so `import fusedrl.engine` (and `fusedrl --help`) imports
neither torch nor transformers.

Subpackages, one job each, from the bottom layer up (tests/checks/layering.py holds the order):
ranks/ (rank helpers and collectives), runs/ (what a run leaves on disk), config/ (torch-free config
dataclasses and their YAML I/O), sandbox/ (the processes that run the model's and the user's code),
data/ (records, tokenization, packing), model/ (the decoder, attention, HF I/O, reward and value
models), parallel/ (the parallel layout), inference/ (paged-KV generation), train/ (the training
loop, optimizers, checkpoints, run logs), plan/ (the memory plan), agents/ (tools and environments
in multi-turn rollouts), stages/ (sft, rm, ppo/, rewards/), demos/ (`fusedrl demo`), cli/ (the
`fusedrl` command); errors.py, trainers.py and api.py beside them (docs/architecture.md).
"""
import importlib

if __name__ != "fusedrl.engine":  # e.g. `import engine` from the repository root
    raise ImportError(f"{__file__} is the package fusedrl.engine: import it by that name "
                      f"(after `pip install -e .`), not as {__name__!r}")

_PUBLIC = {
    "SFTConfig": ".config.train", "RMConfig": ".config.train", "PPOConfig": ".config.ppo",
    "GRPOConfig": ".config.ppo", "run_sft": ".api", "run_rm": ".api", "run_ppo": ".api",
    "run_grpo": ".api", "TrainResult": ".trainers", "SFTTrainer": ".trainers",
    "RewardTrainer": ".trainers", "PPOTrainer": ".trainers", "GRPOTrainer": ".trainers",
    "DistillConfig": ".config.distill", "DistillTrainer": ".trainers",
    "Callback": ".train.callbacks", "FusedRLError": ".errors", "UsageError": ".errors",
    "DataError": ".data.records",
    "LLM": ".inference.llm", "RequestOutput": ".inference.llm", "Completion": ".inference.llm",
    "SamplingParams": ".inference.sampling_params", "CausalLM": ".model.causal_lm",
    "load_model": ".model.hf_io", "save_model": ".model.hf_io",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name], __name__), name)


def __dir__():
    return sorted(list(globals()) + __all__)

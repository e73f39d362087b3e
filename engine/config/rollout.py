"""The rollout section of PPO and GRPO (`rollout.*`): how prompts are sampled, the KV pool, long
answers (partial rollouts, speculative decoding, chunked prefill) and multi-turn trajectories
(tools, environments). Torch-free."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .fields import check, check_fields, option

# A forward's token budget at auto (rollout.tokens_per_forward, ppo.tokens_per_microbatch): this
# many tokens, or one full-length row where a row is longer.
AUTO_FORWARD_TOKENS = 16384
# The smallest rollout.temperature (and distill.temperature), the floor SamplingParams keeps
# (inference/sampling_params.py says why): a smaller one would pass here and fail only once the
# models load and a rollout runs, with log-probs gone NaN. Rollouts have no greedy 0: GRPO and PPO
# learn from the differences between samples.
MIN_TEMPERATURE = 1e-4

EnvErrors = Literal["skip", "fail"]
EnvIsolation = Literal["process", "thread"]


@dataclass
class RolloutConfig:
    prompts_per_iteration: int = option(
        "prompts sampled per PPO iteration on each rank (under torchrun: x the "
        "number of ranks in all)", 16)
    samples_per_prompt: int = option(
        "responses generated per prompt (they share the prompt's KV blocks)", 4)
    max_prompt_length: int = option("prompts keep their last this many tokens", 256)
    truncate_prompts: bool = option(
        "cut a prompt that leaves no room to generate within the model's "
        "context to its last max_model_len - 1 tokens (counted) instead of "
        "failing on it", False)
    max_new_tokens: int = option("response length limit", 64)
    temperature: float = option(
        f"sampling temperature (>= {MIN_TEMPERATURE:g}); log-probs are taken at the same "
        "temperature", 1.0)
    top_k: int = option("top-k filter of the sampler (0 = off)", 0)
    top_p: float = option("nucleus filter of the sampler (1.0 = off)", 1.0)
    ignore_eos: bool = option(
        "sample past EOS up to max_new_tokens (fixed-length rollouts, for benchmarks)", False)
    kv_cache_memory: int | float | str = option(
        "the paged KV pool: bytes (an int), a fraction of the GPU's memory in (0, 1], or auto: on "
        "CUDA the largest pool that fits beside everything else in every phase that holds it (the "
        "memory plan's rules: `fusedrl plan`; with release_kv_pool the rollout alone), checked "
        "against the free memory when it is allocated; on the CPU 1 GiB. Never more than "
        "prompts_per_iteration x samples_per_prompt full-length sequences (twice that with "
        "partial_rollouts)", "auto")
    release_kv_pool: bool = option(
        "free the KV pool after each rollout (scoring and the update use its memory) "
        "and allocate it again for the next, where CUDA graphs allow: not in one "
        "process on CUDA (a captured decode step holds the pool's addresses), yes "
        "under torchrun (graphs off, but with rollout.persistent_weights) and on the CPU",
        False)
    persistent_weights: bool = option(
        "under torchrun at train.tensor_parallel=1: generate from whole-size copies of "
        "the policy's shards, allocated once and refilled in place before each "
        "rollout, so CUDA graphs stay on; costs one whole policy per GPU kept through "
        "training (none with train.data_parallel=replicate, whose shards are whole)",
        False)
    tokens_per_forward: int | str | None = option(
        "token budget of one scoring forward (reward model, reference, "
        "old log-probs, values): a rank's rows are cut, in order, into "
        "forwards of at most this many tokens, so none holds more "
        "activations; it must hold one row (max_prompt_length + "
        "max_new_tokens); auto = the larger of 16384 and one row; "
        "null = all rows at once", "auto")
    block_size: int = option("tokens per KV block", 16)
    exact: bool = option(
        "exact on-policy: generation and the old-log-prob forward run batch-invariant "
        "fixed-order ops, so the sampler's log-probs equal the training forward's bit for "
        "bit (logprob_mismatch is 0, the IS correction a no-op); slower generation", False)
    routing_replay: bool = option(
        "MoE policies: keep the sampler's expert choices of every token and route the "
        "old-log-prob and update forwards by them (Megatron's moe_enable_routing_replay), "
        "so sampler and trainer agree on the experts; no effect on dense models", True)
    dynamic_sampling: bool = option(
        "DAPO dynamic sampling: drop prompt groups whose scores are all equal and "
        "sample more prompts until prompts_per_iteration groups are kept (with "
        "partial_rollouts: train the varied ones of the groups complete, the groups in flight "
        "topping the next iteration up)", False)
    max_sampling_rounds: int = option(
        "dynamic sampling of whole groups: at most this many generate rounds per iteration", 4)
    overlong_buffer: int = option(
        "DAPO overlong shaping: responses longer than max_new_tokens - overlong_buffer "
        "lose up to overlong_penalty, linearly (0 = off)", 0)
    overlong_penalty: float = option("overlong shaping: the penalty at max_new_tokens", 1.0)
    partial_rollouts: bool = option(
        "cut the long tail (Kimi k1.5's partial rollouts): an iteration tops the groups in flight "
        "up to twice prompts_per_iteration and decodes until prompts_per_iteration groups are "
        "complete or tokens_per_iteration tokens are drawn; unfinished answers keep their tokens, "
        "log-probs and the policy version of each token, free their KV and continue next "
        "iteration under the new weights; a group trains once all its samples are done "
        "(ppo.is_mode then defaults to tis)", False)
    tokens_per_iteration: int | None = option(
        "partial rollouts: tokens an iteration draws on each rank before it stops, complete groups "
        "or not (null = no budget: it stops at prompts_per_iteration complete groups)")
    max_staleness: int = option(
        "partial rollouts: a carried answer whose oldest token is more than this many iterations "
        "old when it would train is dropped and sampled again (counted)", 4)
    speculative_tokens: int = option(
        "speculative decoding for the tail: tokens each row drafts by n-gram lookup in its own "
        "prompt and answer, verified in one forward (0 = off)", 0)
    speculate_below: int = option(
        "speculate only on decode steps of fewer than this many rows (the tail)", 8)
    prefill_chunk: int | None = option(
        "a prompt (or carried answer) longer than this many tokens is prefilled in chunks, taking "
        "turns with the other rows' decode steps (null = in one piece)")
    overlap_decode: bool | None = option(
        "launch each decode step before reading the one it continues, so the device runs a step "
        "while the host books the last (null = on a GPU, and not beside rollout.routing_replay; "
        "docs/generation.md)")
    tools: list[str] | None = option(
        "multi-turn: 'module:function' tools (type hints and a docstring with Args:) offered "
        "through the chat template; the model's tool calls are run and answered as tool messages, "
        "and a turn without a call ends the trajectory (docs/agents.md)")
    environment: str | None = option(
        "multi-turn: 'module:Class' made per trajectory with the row's columns as keywords, with "
        "reset() -> messages and step(assistant_message) -> (messages, reward, done); the "
        "trajectory's score is the sum of its rewards (plus reward_fn / reward_model when set)")
    max_turns: int = option("multi-turn: model turns per trajectory (each at most max_new_tokens)",
                            4)
    max_trajectory_tokens: int | None = option(
        "multi-turn: tokens of a whole trajectory, prompt included (null = the model's context)")
    env_timeout_s: float = option(
        "multi-turn: one environment or tool call (reset, step) that runs longer ends its "
        "trajectory (see env_errors)", 60.0)
    env_errors: EnvErrors = option(
        "multi-turn: an environment's exception, timeout, oversized or unrenderable messages end "
        "that trajectory, which leaves the batch (its group's statistics computed without it), "
        "counted in env/errors and env/timeouts (skip), or the run in one line (fail)", "skip")
    env_isolation: EnvIsolation = option(
        "multi-turn: each trajectory's environment (and its tools) in a worker process of its own, "
        "killed at env_timeout_s with what it started (process), or in the trainer's threads "
        "(thread: a hung call is left running)", "process")
    max_observation_chars: int = option(
        "multi-turn: the characters of the messages one environment call may return; more ends "
        "the trajectory as an environment error (see env_errors)", 100_000)

    @property
    def max_rows(self) -> int:
        """The rows a rank's engine runs at once (its max_num_seqs): prompts_per_iteration x
        samples_per_prompt, twice that with partial rollouts (their groups in flight)."""
        rows = self.prompts_per_iteration * self.samples_per_prompt
        return 2 * rows if self.partial_rollouts else rows

    @property
    def forward_tokens(self) -> int | None:
        """tokens_per_forward resolved: auto is the larger of 16384 and one full-length row."""
        if self.tokens_per_forward == "auto":
            return max(AUTO_FORWARD_TOKENS, self.max_prompt_length + self.max_new_tokens)
        return self.tokens_per_forward

    def __post_init__(self):
        check_fields(self, "rollout.")
        for name in ("prompts_per_iteration", "samples_per_prompt", "max_prompt_length",
                     "max_new_tokens",
                     "block_size", "max_sampling_rounds", "speculate_below"):
            check(getattr(self, name) >= 1,
                  f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_staleness", "speculative_tokens"):
            check(getattr(self, name) >= 0,
                  f"rollout.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tokens_per_iteration", "prefill_chunk"):
            check(getattr(self, name) is None or getattr(self, name) >= 1,
                  f"rollout.{name} must be >= 1 or null, got {getattr(self, name)}")
        self.kv_cache_memory = kv_budget(self.kv_cache_memory)
        self._check_multi_turn()
        longest = self.max_prompt_length + self.max_new_tokens
        check(self.tokens_per_forward in (None, "auto") or (isinstance(self.tokens_per_forward, int)
                                                            and self.tokens_per_forward >= longest),
              f"rollout.tokens_per_forward={self.tokens_per_forward!r} must hold one row: "
              "rollout.max_prompt_length "
              f"+ rollout.max_new_tokens = {longest} tokens (or be auto or null)")
        check(MIN_TEMPERATURE <= self.temperature < math.inf,
              f"rollout.temperature must be a finite number >= {MIN_TEMPERATURE:g} (a smaller "
              "one is greedy in all but name and overflows the scaled logits), got "
              f"{self.temperature}")
        check(self.top_k >= 0, f"rollout.top_k must be >= 0 (0 = off), got {self.top_k}")
        check(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")
        check(0 <= self.overlong_buffer < self.max_new_tokens and self.overlong_penalty >= 0,
              f"rollout.overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}) and "
              f"rollout.overlong_penalty >= 0, got {self.overlong_buffer} and "
              f"{self.overlong_penalty}")

    @property
    def multi_turn(self) -> bool:
        """Trajectories of several turns: tools or an environment are set."""
        return bool(self.tools or self.environment)

    def _check_multi_turn(self) -> None:
        check(self.max_turns >= 1, f"rollout.max_turns must be >= 1, got {self.max_turns}")
        check(self.max_observation_chars >= 1, "rollout.max_observation_chars must be >= 1, "
              f"got {self.max_observation_chars}")
        check(0 < self.env_timeout_s <= 1e6,
              f"rollout.env_timeout_s must be in (0, 1e6] seconds, got {self.env_timeout_s}")
        check(self.max_trajectory_tokens is None or self.max_trajectory_tokens >= 2,
              "rollout.max_trajectory_tokens must be >= 2 or null, got "
              f"{self.max_trajectory_tokens}")


def kv_budget(value) -> int | float | str:
    """rollout.kv_cache_memory checked: bytes (an int >= 1; an integral float such as 8.0e9 too), a
    fraction in (0, 1], or 'auto'."""
    if isinstance(value, float) and value > 1 and value.is_integer():
        value = int(value)
    ok = (value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)
          or (isinstance(value, float) and 0 < value <= 1))
    check(ok, f"rollout.kv_cache_memory must be bytes (an int >= 1), a fraction of the GPU's "
              f"memory in (0, 1] or auto, got {value!r}")
    return value

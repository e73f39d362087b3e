"""LLM: the generation API. `LLM(model_dir).generate(prompts, SamplingParams(...))`.

Wires checkpoint loading, the block manager, the scheduler and the model runner together, validates
requests up front (so a bad one fails before any work), and runs steps until every sequence is done.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from ..config.compatibility import refuse_incompatible
from ..errors import ConfigValueError, NonFiniteError
from .block_manager import BlockManager
from .group_stop import GroupsDone
from ..model.hf_io import load_model, load_tokenizer
from ..model.causal_lm import CausalLM
from ..model.invariant import BatchInvariant
from .runner import ModelRunner, num_blocks_for_budget
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence
from .turns import OnTurnEnd, Trajectory, generate_turns
from ..parallel.validate import check_exact_generation

CPU_DEFAULT_KV_BYTES = 1 << 30  # CPU has no "free memory" to take a fraction of: 1 GiB
# The rollout options LLM's arguments are, by the names the compatibility table's lines give them.
LLM_ARGUMENTS = {"rollout.exact": "batch_invariant", "rollout.prefill_chunk": "prefill_chunk",
                 "rollout.speculative_tokens": "speculative_tokens",
                 "rollout.routing_replay": "record_routing"}


@dataclass
class Completion:
    """One sampled continuation: token_ids [T] and the fp32 log-prob of each under its sampling
    distribution [T] (batch-invariant mode: under softmax(logits / temperature), unfiltered);
    finish_reason is 'stop' (EOS or a stop token) or 'length'. logprob_slots [T]: where those
    log-probs are on the device, for `LLM.device_logprobs` (valid until the next generate)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str | None = None
    logprob_slots: list[int] = field(default_factory=list)
    routing_rows: list[int] = field(default_factory=list)  # record_routing: see LLM.device_routing


@dataclass
class RequestOutput:
    """The n completions of one prompt, in sample order."""

    prompt_token_ids: list[int]
    outputs: list[Completion]


class LLM:
    """Paged-KV generation engine over a Llama-family model.

    model_dir: a Hugging Face directory (config.json, safetensors, optionally a tokenizer), or a
    `CausalLM` already in memory: the trainer's own parameters, used in place (`dtype` and `device`
    are then the model's; pass `tokenizer` for string prompts). In-place updates (optimizer steps,
    `copy_`) are seen by the next `generate`, CUDA graphs included; replacing Parameter objects is
    not. A model sharded by `engine.parallel.layout` generates with its tensor group
    (every rank of it calls `generate` with the same prompts), from its slices and its heads' KV.
    kv_cache_memory: bytes (int) or a fraction of free GPU memory (float); default 0.9 of free GPU
    memory on CUDA (pass a budget when a trainer shares the GPU), 1 GiB on CPU. The pool is never
    larger than max_num_seqs full-length sequences.
    max_num_batched_tokens: prompt tokens per prefill step (a longer lone prompt still runs).
    use_cuda_graphs: capture decode steps as CUDA graphs (CUDA only); False runs them eagerly.
    batch_invariant: exact on-policy mode: every step runs in batch-invariant primitives
    (`model.invariant`: fixed-tile Triton kernels on GPUs, fixed-order torch ops on the CPU), so a
    token's log-prob does not depend on the batch and equals, bit for bit, what
    `self.batch_invariant.head_logprobs(self.batch_invariant.packed_hidden(...))` gives for it; the
    log-prob is then under softmax(logits / temperature) (top-k/top-p filter the draw only). Decode
    steps are still CUDA graphs; the cost is in the kernels (fp32 logits, no cuBLAS, no split-KV by
    batch). A `BatchInvariant` object instead of True sets the mode's attention segment (its
    chunk_size must be block_size). `self.batch_invariant` is the mode object (None when off).
    fuse_decode_gemms: where the Triton kernels run, a decode step's RMSNorms and SiLU * up ride in
    the q/k/v and gate/up GEMMs (kernels/model/norm_linear.py: 5 kernels a layer); False keeps
    torch's GEMM after each norm (7), for side-by-side measurement against cuBLAS.
    record_routing: an MoE model's expert choices for every token are kept (routing_record.py) and
    read back with `device_routing` (routing replay).
    speculative_tokens: on decode steps of fewer than `speculate_below` rows (the long tail), each
    row drafts up to this many tokens by n-gram lookup in its own tokens (ngram_draft.py) and one
    forward verifies them (`ModelRunner.verify`): the same tokens and log-probs as plain decoding
    draws from the same logits (greedy or sampled), in fewer forwards where the text repeats itself;
    verify steps run eagerly (no CUDA graph). Not with batch_invariant (its decode walk is what the
    trainer reproduces bit for bit) nor record_routing.
    prefill_chunk: a prompt longer than this is prefilled a chunk a step, the chunks taking turns
    with the other sequences' decode steps (Scheduler); the same tokens and log-probs.
    `self.device` is the model's device: tensors handed to `self.model` go there.
    """

    def __init__(self, model_dir, dtype="auto", kv_cache_memory: int | float | None = None,
                 block_size: int = 16, device=None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 16384, use_cuda_graphs: bool = True, tokenizer=None,
                 batch_invariant: bool | BatchInvariant = False, fuse_decode_gemms: bool = True,
                 record_routing: bool = False, speculative_tokens: int = 0,
                 speculate_below: int = 8, prefill_chunk: int | None = None):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be an int >= 1")
        if isinstance(batch_invariant, BatchInvariant):
            if batch_invariant.chunk_size != block_size:
                raise ValueError(
                    f"batch_invariant.chunk_size={batch_invariant.chunk_size} must be the "
                    f"block_size {block_size}")
        elif not isinstance(batch_invariant, bool):
            raise ValueError(
                f"batch_invariant={batch_invariant!r} must be True, False or a BatchInvariant")
        self.batch_invariant = (BatchInvariant(block_size) if batch_invariant is True
                                else batch_invariant or None)
        for name, value in (("max_num_seqs", max_num_seqs),
                            ("max_num_batched_tokens", max_num_batched_tokens),
                            ("speculate_below", speculate_below)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an int >= 1")
        if prefill_chunk is not None and (not isinstance(prefill_chunk, int) or prefill_chunk < 1):
            raise ValueError(f"prefill_chunk={prefill_chunk!r} must be an int >= 1 or None")
        if not isinstance(speculative_tokens, int) or speculative_tokens < 0:
            raise ValueError(f"speculative_tokens={speculative_tokens!r} must be an int >= 0")
        # The pairs of these arguments are the compatibility table's, as the rollout options they
        # are (record_routing: an MoE model's).
        arguments = SimpleNamespace(rollout=SimpleNamespace(
            exact=self.batch_invariant is not None, prefill_chunk=prefill_chunk,
            speculative_tokens=speculative_tokens, routing_replay=record_routing))
        refuse_incompatible(arguments, moe=record_routing, names=LLM_ARGUMENTS)
        self.speculative_tokens, self.speculate_below = speculative_tokens, speculate_below
        # speculative decoding's draft tokens verified and accepted since take_speculation()
        self.speculation = {"drafted": 0, "accepted": 0}
        if isinstance(model_dir, CausalLM):
            self.model = model_dir
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_model(model_dir, dtype=dtype, device=device)
            tokenizer = tokenizer or directory_tokenizer(Path(model_dir))
        self.tokenizer = tokenizer
        self.config = self.model.config
        refuse_incompatible(arguments, moe=self.config.moe is not None, names=LLM_ARGUMENTS)
        param = next(self.model.parameters())
        # Where the model runs, the KV pool and every step's tensors live: the parameters' device,
        # or `device` for a model whose resting shards are elsewhere (FSDP2's CPU offload: CPU
        # shards, gathered onto the GPU to run).
        offloaded = (device is not None and isinstance(model_dir, CausalLM)
                     and torch.device(device).type != param.device.type)
        self.device = torch.device(device) if offloaded else param.device
        if kv_cache_memory is None:
            kv_cache_memory = 0.9 if self.device.type == "cuda" else CPU_DEFAULT_KV_BYTES
        tp = self.model.tensor_parallel  # parallel/tensor_parallel.py: its slices, its heads' KV
        check_exact_generation(self.batch_invariant is not None, tp)
        num_blocks = num_blocks_for_budget(kv_cache_memory, self.config, param.dtype, block_size,
                                           self.device, tp.size if tp else 1)
        num_blocks = min(num_blocks, max_num_seqs * -(-self.config.max_model_len // block_size))
        if num_blocks < 1:
            raise ConfigValueError(
                f"kv_cache_memory={kv_cache_memory!r} does not hold one block of "
                             f"{block_size} tokens")
        self.block_manager = BlockManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs,
                                   max(max_num_batched_tokens, self.config.max_model_len),
                                   self.config.max_model_len, self.config.eos_token_ids,
                                   prefill_chunk)
        self.runner = ModelRunner(self.model, num_blocks, block_size, max_num_seqs, use_cuda_graphs,
                                  self.batch_invariant, fuse_decode_gemms, record_routing,
                                  device=self.device, tensor_parallel=tp)
        self._next_seq_id = 0
        # Every tensor rank must draw the same seeds (they sample the same rows in lockstep).
        self._rng = random.Random(tp.same_on_ranks(random.getrandbits(63)) if tp else None)

    def generate(self, prompts,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, decode_text: bool = True) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids; one prompt or a list of them).

        Returns one RequestOutput per prompt, in order, each with `sampling_params.n` completions.
        decode_text=False leaves Completion.text None: rollouts that only read token ids skip the
        tokenizer's decode of every response.
        """
        if isinstance(prompts, (list, tuple)) and not prompts:
            return []
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        token_ids = [self._tokenize(p, i) for i, p in enumerate(prompts)]
        for i, (ids, p) in enumerate(zip(token_ids, params)):
            self._check_request(i, ids, p)
        groups = [[self._add(ids, p, j) for j in range(p.n)] for ids, p in zip(token_ids, params)]
        self._run(sum(len(g) for g in groups), use_tqdm)
        self._collect_logprobs([s for g in groups for s in g])
        return [RequestOutput(ids, [self._completion(s, decode_text) for s in group])
                for ids, group in zip(token_ids, groups)]

    def generate_turns(self, prompts: list[list[int]], sampling_params: SamplingParams,
                       on_turn_end: OnTurnEnd, *, max_turns: int,
                       max_total_tokens: int | None = None) -> list[Trajectory]:
        """Multi-turn trajectories (turns.py): each pauses at the end of a turn, KV kept, while
        on_turn_end(row, turn's token ids) gives the next turn's prompt tokens (or a Future of
        them)."""
        return generate_turns(self, prompts, sampling_params, on_turn_end, max_turns=max_turns,
                              max_total_tokens=max_total_tokens)

    def continue_answers(self, prompts: list[list[int]], answers: list[list[int]], seeds: list[int],
                         params: SamplingParams, token_budget: int | None = None,
                         groups: list[int] | None = None, groups_needed: int | None = None
                         ) -> list[Completion]:
        """Generate each answer on from where it stands (prompt + answer prefilled again: a partial
        rollout's carried answers under new weights; an empty answer starts one), each row drawing
        from its own seed's stream at its own positions, as one uninterrupted generate would, with
        params.max_new_tokens counting the answer's earlier tokens. token_budget: stop every row
        once this many tokens were drawn (the step that passes it ends; a step draws a token a row);
        groups (one id per row) and groups_needed: stop once that many groups have all their rows
        finished. Stopped rows have finish_reason None (their blocks freed).
        Returns one Completion per row of the tokens and log-probs added by this call."""
        if len({len(prompts), len(answers), len(seeds)}) != 1:
            raise ValueError(f"{len(prompts)} prompts, {len(answers)} answers and {len(seeds)} "
                             "seeds: expected as many")
        seqs = []
        for i, (prompt, answer, seed) in enumerate(zip(prompts, answers, seeds)):
            self._check_request(i, list(prompt), params)
            end = min(len(prompt) + params.max_new_tokens, self.config.max_model_len)
            if len(prompt) + len(answer) >= end:
                raise ValueError(f"answers[{i}] has {len(answer)} tokens: nothing is left to "
                                 "generate")
            seqs.append(Sequence(self._next_seq_id, list(prompt) + list(answer), params, seed,
                                 len(prompt)))
            self._next_seq_id += 1
            self.scheduler.add(seqs[-1])
        starts = [seq.num_tokens for seq in seqs]
        stop = None if groups_needed is None else GroupsDone(seqs, groups, groups_needed)
        self._run(len(seqs), False, token_budget, stop)
        self._collect_logprobs(seqs)
        return [Completion(seq.token_ids[start:], seq.logprobs, seq.finish_reason, None,
                           seq.logprob_slots) for seq, start in zip(seqs, starts)]

    def take_speculation(self) -> dict:
        """{"drafted", "accepted"}: speculative decoding's draft tokens verified and accepted since
        the last call (zeros without speculative_tokens); starts counting again."""
        counts, self.speculation = self.speculation, {"drafted": 0, "accepted": 0}
        return counts

    def device_logprobs(self, slots: list[int]) -> torch.Tensor:
        """The last generate's sampled log-probs at these Completion.logprob_slots, as one fp32
        tensor [len(slots)] on `self.device`: what a trainer reads without a host round trip."""
        if slots and not 0 <= min(slots) <= max(slots) < self.runner.logprobs_kept:
            raise ValueError(
                f"slots must be in [0, {self.runner.logprobs_kept}) (the last generate's "
                f"sampled tokens), got {min(slots)}..{max(slots)}")
        return self.runner.gather_logprobs(slots)

    def device_routing(self, rows: list[int]) -> torch.Tensor:
        """With record_routing: the last generate's routing records at these Completion.routing_rows
        (one per prompt + completion token), [len(rows), sparse layers, k] int16 on `self.device`,
        -1 where a token has none: the experts an MoE model chose for each token."""
        if self.runner.routing is None:
            raise ValueError("device_routing: this LLM was made without record_routing=True")
        return self.runner.routing.gather(rows)

    def _tokenize(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"prompts[{index}] is a string but no tokenizer was found; pass token ids")
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError(f"prompts[{index}] must be a string or a list of ints")
        return list(prompt)

    def _check_request(self, index: int, ids: list[int], params: SamplingParams):
        max_len, vocab = self.config.max_model_len, self.config.vocab_size
        if not isinstance(params, SamplingParams):
            raise TypeError(
                f"sampling_params[{index}] must be a SamplingParams, got {type(params).__name__}")
        if not ids:
            raise ValueError(f"prompts[{index}] is empty: a prompt needs at least one token")
        if len(ids) >= max_len:
            raise ValueError(
                f"prompts[{index}] has {len(ids)} tokens, which leaves no room to generate "
                f"within the context length max_model_len={max_len}")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompts[{index}] has token id {bad[0]} outside the vocabulary [0, {vocab})")
        longest = min(len(ids) + params.max_new_tokens, max_len)
        needed = self.block_manager.blocks_for(longest)
        if needed > self.block_manager.num_blocks:
            raise ValueError(
                f"the KV pool ({self.block_manager.num_blocks} blocks of "
                f"{self.block_manager.block_size} tokens) cannot hold one sequence of "
                f"prompts[{index}] ({longest} tokens = {needed} blocks); "
                "raise kv_cache_memory or lower max_new_tokens")

    def _add(self, ids: list[int], params: SamplingParams, sample_index: int) -> Sequence:
        # Sample j of a seeded request gets its own stream, fixed by (seed, prompt, j): the same
        # wherever the prompt sits in the batch, and never another prompt's. Keyed by (seed, j)
        # alone, sample j of every prompt would read the same random numbers and choose alike: a
        # rollout of 16 prompts x 8 samples would hold 8 independent draws, not 128.
        seed = (self._rng.getrandbits(63) if params.seed is None
                else hash((params.seed, tuple(ids), sample_index)))
        seq = Sequence(self._next_seq_id, ids, params, seed & (2**63 - 1))
        self._next_seq_id += 1
        self.scheduler.add(seq)
        return seq

    def _run(self, num_seqs: int, use_tqdm: bool, token_budget: int | None = None, stop=None):
        """Steps until every sequence is done, or (token_budget) until that many tokens were
        drawn, or until stop(the step's finished sequences) says so: the unfinished are then stopped
        (Scheduler.abort), finish_reason None."""
        progress = None
        decoded = 0
        if use_tqdm:
            from tqdm.auto import tqdm
            progress = tqdm(total=num_seqs, desc="generate", unit="seq")
        self.runner.logprobs_kept = 0
        if self.runner.routing is not None:
            self.runner.routing.reset()
        try:
            while not self.scheduler.is_finished():
                batch, is_prefill = self.scheduler.schedule()
                before = self.runner.logprobs_kept
                finished = self._step(batch, is_prefill)
                decoded += self.runner.logprobs_kept - before  # the tokens this step drew
                spent = token_budget is not None and decoded >= token_budget
                if spent or (stop is not None and stop(finished)):
                    self.scheduler.abort()
                if progress is not None:
                    progress.update(len(finished))
        finally:
            if progress is not None:
                progress.close()

    def _step(self, batch: list[Sequence], is_prefill: bool) -> list[Sequence]:
        """Run one scheduled step (a decode step of the tail speculatively: `_drafts`), append its
        tokens and their log-prob slots; returns the sequences it finished."""
        if is_prefill and batch[0].chunk_end is not None:  # a prompt's chunk, not its last
            self.runner.prefill_chunk(batch[0])
            self.scheduler.chunk_done(batch[0])
            return []
        first = self.runner.logprobs_kept
        drafts = None if is_prefill else self._drafts(batch)
        if drafts is None:
            tokens = self.runner.run(batch, is_prefill)
            for slot, seq in enumerate(batch, start=first):
                seq.logprob_slots.append(slot)
            return self.scheduler.postprocess(batch, tokens)
        emitted = self.runner.verify(batch, drafts)
        self.speculation["drafted"] += sum(map(len, drafts))
        # a row emits its accepted draft tokens and the one draw after them
        self.speculation["accepted"] += sum(len(tokens) - 1 for tokens in emitted)
        before = [seq.num_tokens for seq in batch]
        finished = self.scheduler.postprocess(batch, emitted)
        # A finishing token drops the tokens after it: their slots are skipped.
        for seq, tokens, had in zip(batch, emitted, before):
            seq.logprob_slots += range(first, first + seq.num_tokens - had)
            first += len(tokens)
        return finished

    def _drafts(self, batch: list[Sequence]) -> list[list[int]] | None:
        """Each row's n-gram draft, cut to its token limits and to the KV slots free blocks give it;
        None (a plain decode step) off the tail or where no row has a draft."""
        if not self.speculative_tokens or len(batch) >= self.speculate_below:
            return None
        drafts = []
        for seq in batch:
            room = min(seq.params.max_new_tokens - (seq.num_tokens - seq.num_prompt_tokens),
                       self.config.max_model_len - seq.num_tokens) - 1  # the draw after the draft
            draft = seq.draft_index.draft(seq.token_ids, min(self.speculative_tokens, room))
            slots = (self.block_manager.reserve(seq, seq.num_tokens + len(draft)) if draft
                     else seq.num_tokens)
            drafts.append(draft[:slots - seq.num_tokens])
        return drafts if any(drafts) else None

    def _collect_logprobs(self, seqs: list[Sequence]) -> None:
        """Fill each sequence's host log-probs from the device buffer (one copy for the whole call),
        raising NonFiniteError at a log-prob that is not finite, which only non-finite logits give
        (a NaN or +inf logit spoils the whole softmax; a sampled token has probability > 0)."""
        kept = self.runner.kept_logprobs()
        for seq in seqs:
            seq.logprobs = [kept[slot] for slot in seq.logprob_slots]
            bad = next((x for x in seq.logprobs if not math.isfinite(x)), None)
            if bad is not None:
                raise NonFiniteError(
                    f"the model's logits are not finite (sampled log-prob {bad} for request "
                    f"{seq.seq_id}): its weights or activations hold NaN or inf")

    def _completion(self, seq: Sequence, decode_text: bool) -> Completion:
        ids = seq.completion_token_ids
        text = (self.tokenizer.decode(ids, skip_special_tokens=True)
                if self.tokenizer and decode_text else None)
        # the last token: never forwarded
        rows = seq.routing_rows + [-1] * (seq.num_tokens - len(seq.routing_rows))
        return Completion(ids, seq.logprobs, seq.finish_reason, text, seq.logprob_slots, rows)


def _is_single_prompt(prompts) -> bool:
    """A string or a list of token ids (rather than a list of prompts)."""
    return (isinstance(prompts, str)
            or (isinstance(prompts, (list, tuple)) and isinstance(prompts[0], int)))


def directory_tokenizer(model_dir: Path):
    """The directory's tokenizer, or None when it has none (token-id prompts still work)."""
    if not any((model_dir / f).exists()
               for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    return load_tokenizer(model_dir)

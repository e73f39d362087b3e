"""LLM: the generation API. `LLM(model_dir).generate(prompts, SamplingParams(...))`.

A builder: checkpoint loading, then the parts of the engine's one loop (engine_loop.py: add,
step, run), its block manager, scheduler, model runner and drafts, made from the model and the
arguments; `generate` and `generate_turns` (multi_turn.py) build its Requests and read its sequences
back (a caller with Requests of its own, carried answers among them, runs them with `run`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigValueError
from .block_manager import BlockManager
from ..model.hf_io import load_model, load_tokenizer
from ..model.causal_lm import CausalLM
from ..model.invariant import BatchInvariant
from .engine_loop import EngineLoop
from .exact_pairs import refuse_beside_exact
from .multi_turn import OnTurnEnd, Trajectory, generate_turns
from .drafts import Drafts
from .request import Request
from .runner import ModelRunner, num_blocks_for_budget
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import Sequence, routing_rows
from .stop_rules import StopRule

CPU_DEFAULT_KV_BYTES = 1 << 30  # CPU has no "free memory" to take a fraction of: 1 GiB


@dataclass
class Completion:
    """One sampled continuation: token_ids [T] and the fp32 log-prob of each under its sampling
    distribution [T] (batch-invariant mode: under softmax(logits / temperature), unfiltered);
    finish_reason is 'stop' (EOS or a stop token), 'length', or None (stopped by a stop rule).
    logprob_slots [T]: where those log-probs are on the device, for `LLM.device_logprobs`;
    routing_rows (with record_routing): one per token of the whole sequence, prompt (and a carried
    answer) included, for `LLM.device_routing` (-1 for the last token, never forwarded). Both are
    valid until the engine's next run."""

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


class LLM(EngineLoop):
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
    use_cuda_graphs: capture decode steps as CUDA graphs (CUDA only, and not on the torch
        backend, whose reference ops are not capturable); False runs them eagerly.
    batch_invariant: exact on-policy mode: every step runs in batch-invariant primitives
    (`model.invariant`: fixed-tile Triton kernels on GPUs, fixed-order torch ops on the CPU), so a
    token's log-prob does not depend on the batch and equals, bit for bit, what
    `self.batch_invariant.head_logprobs(self.batch_invariant.packed_hidden(...))` gives for it; the
    log-prob is then under softmax(logits / temperature) (top-k/top-p filter the draw only). Decode
    steps are still CUDA graphs; the cost is in the kernels (fp32 logits, no cuBLAS, no split-KV by
    batch). A `BatchInvariant` object instead of True sets the mode's attention segment (its
    chunk_size must be block_size). `self.batch_invariant` is the mode object (None when off).
    fuse_decode_gemms: where the Triton kernels run, a decode step of up to 16 rows
    (primitives.FUSED_NORM_LINEAR_ROWS) has its RMSNorms and SiLU * up ride in the q/k/v and gate/up
    GEMMs (kernels/model/norm_linear.py: 5 kernels a layer; more rows: 8, cuBLAS's GEMMs); False
    keeps torch's GEMM after each norm at every batch, for side-by-side measurement against cuBLAS.
    record_routing: an MoE model's expert choices for every token are kept (routing_record.py) and
    read back with `device_routing` (routing replay).
    speculative_tokens: on decode steps of fewer than `speculate_below` rows (the long tail), each
    row drafts up to this many tokens by n-gram lookup in its own tokens (ngram_draft.py) and one
    forward verifies them (`ModelRunner.verify`): the same tokens and log-probs as plain decoding
    draws from the same logits (greedy or sampled), in fewer forwards where the text repeats itself;
    verify steps run eagerly (no CUDA graph); with tensor slices every rank drafts and accepts alike
    (the same tokens, the gathered logits). Not with batch_invariant (its decode walk is what the
    trainer reproduces bit for bit: exact_pairs.py).
    prefill_chunk: a prompt longer than this is prefilled a chunk a step, the chunks taking turns
    with the other sequences' decode steps (Scheduler); the same tokens and log-probs.
    overlap_decode: launch a decode step before reading the one it continues (engine_loop.py), so
    the device runs a step while the host reads and books the one before. None (the default): on a
    GPU, where a step is launched and run apart; on the CPU a step runs where it is launched, and
    a step ahead would only add the rows the step before ended. Not on the speculative tail's
    steps (fewer than speculate_below rows) nor where routing records are kept.
    `self.device` is the model's device: tensors handed to `self.model` go there.
    """

    def __init__(self, model_dir, dtype="auto", kv_cache_memory: int | float | None = None,
                 block_size: int = 16, device=None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 16384, use_cuda_graphs: bool = True, tokenizer=None,
                 batch_invariant: bool | BatchInvariant = False, fuse_decode_gemms: bool = True,
                 record_routing: bool = False, speculative_tokens: int = 0,
                 speculate_below: int = 8, prefill_chunk: int | None = None,
                 overlap_decode: bool | None = None):
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
        if isinstance(model_dir, CausalLM):
            self.model = model_dir
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_model(model_dir, dtype=dtype, device=device)
            tokenizer = tokenizer or directory_tokenizer(Path(model_dir))
        self.tokenizer = tokenizer
        self.config = self.model.config
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
        refuse_beside_exact(self.batch_invariant is not None,
                            speculative_tokens=speculative_tokens, prefill_chunk=prefill_chunk,
                            moe=self.config.moe is not None, tensor_parallel=tp is not None)
        num_blocks = num_blocks_for_budget(kv_cache_memory, self.config, param.dtype, block_size,
                                           self.device, tp.size if tp else 1)
        num_blocks = min(num_blocks, max_num_seqs * -(-self.config.max_model_len // block_size))
        if num_blocks < 1:
            raise ConfigValueError(
                f"kv_cache_memory={kv_cache_memory!r} does not hold one block of "
                             f"{block_size} tokens")
        blocks = BlockManager(num_blocks, block_size)
        max_len = self.config.max_model_len
        scheduler = Scheduler(blocks, max_num_seqs, max(max_num_batched_tokens, max_len), max_len,
                              self.config.eos_token_ids, prefill_chunk)
        runner = ModelRunner(self.model, num_blocks, block_size, max_num_seqs, use_cuda_graphs,
                             self.batch_invariant, fuse_decode_gemms, record_routing,
                             device=self.device, tensor_parallel=tp)
        drafts = Drafts(speculative_tokens, speculate_below, blocks, max_len)
        if overlap_decode is None:
            overlap_decode = self.device.type == "cuda"
        elif not isinstance(overlap_decode, bool):
            raise ValueError(f"overlap_decode={overlap_decode!r} must be True, False or None")
        # Every tensor rank must draw the same seeds (they sample the same rows in lockstep).
        super().__init__(scheduler, blocks, runner, drafts,
                         seed=tp.same_on_ranks(random.getrandbits(63)) if tp else None,
                         overlap=overlap_decode)

    def generate(self, prompts,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, decode_text: bool = True,
                 images: list | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids; one prompt or a list of them).

        Returns one RequestOutput per prompt, in order, each with `sampling_params.n` completions.
        decode_text=False leaves Completion.text None: rollouts that only read token ids skip the
        tokenizer's decode of every response. images: a vision-language model's, one ImageInputs
        (or None) per prompt, whose placeholder tokens the prompt holds; its n samples share the
        tower's output and the prompt's KV.
        """
        if isinstance(prompts, (list, tuple)) and not prompts:
            return []
        prompts = [prompts] if _is_single_prompt(prompts) else list(prompts)
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(
                f"sampling_params has {len(params)} entries for {len(prompts)} prompts")
        images = _per_prompt(images, len(prompts))
        token_ids = [self._tokenize(p, i) for i, p in enumerate(prompts)]
        for i, (ids, p, im) in enumerate(zip(token_ids, params, images)):
            self.check(Request(ids, p, images=im), i)
        requests = [Request(ids, p, sample_index=j, images=im)
                    for ids, p, im in zip(token_ids, params, images) for j in range(p.n)]
        seqs = iter(self.run(requests, use_tqdm=use_tqdm))
        return [RequestOutput(ids, [self._completion(next(seqs), decode_text) for _ in range(p.n)])
                for ids, p in zip(token_ids, params)]

    def generate_turns(self, prompts: list[list[int]], sampling_params: SamplingParams,
                       on_turn_end: OnTurnEnd, *, max_turns: int,
                       max_total_tokens: int | None = None,
                       stop: StopRule | None = None) -> list[Trajectory]:
        """Multi-turn trajectories (multi_turn.py): each pauses at the end of a turn, KV kept,
        while on_turn_end(row, turn's token ids) gives the next turn's prompt tokens (or a Future
        of them); `stop` (stop_rules.py) may stop them early."""
        return generate_turns(self, prompts, sampling_params, on_turn_end, max_turns=max_turns,
                              max_total_tokens=max_total_tokens, stop=stop)

    def take_speculation(self) -> dict:
        """{"drafted", "accepted"}: speculative decoding's draft tokens verified and accepted since
        the last call (zeros without speculative_tokens); starts counting again."""
        return self.drafts.take()

    def device_logprobs(self, slots: list[int]) -> torch.Tensor:
        """The last run's sampled log-probs at these logprob_slots (Completion's, Trajectory's), as
        one fp32 tensor [len(slots)] on `self.device`: what a trainer reads without a host round
        trip."""
        if slots and not 0 <= min(slots) <= max(slots) < self.runner.logprobs_kept:
            raise ValueError(
                f"slots must be in [0, {self.runner.logprobs_kept}) (the last run's "
                f"sampled tokens), got {min(slots)}..{max(slots)}")
        return self.runner.gather_logprobs(slots)

    def device_routing(self, rows: list[int]) -> torch.Tensor:
        """With record_routing: the last run's routing records at these routing_rows (Completion's,
        Trajectory's: one per token of a whole sequence), [len(rows), sparse layers, k] int16 on
        `self.device`, -1 where a token has none: the experts an MoE model chose for each token."""
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

    def _completion(self, seq: Sequence, decode_text: bool) -> Completion:
        """The tokens after the prompt with the run's log-probs."""
        ids = seq.token_ids[seq.num_prompt_tokens:]
        text = (self.tokenizer.decode(ids, skip_special_tokens=True)
                if self.tokenizer and decode_text else None)
        return Completion(ids, seq.logprobs, seq.finish_reason, text, seq.logprob_slots,
                          routing_rows(seq))


def _per_prompt(images, count: int) -> list:
    """images (one ImageInputs or None per prompt, or None for none) as a list of `count`."""
    if images is None:
        return [None] * count
    if len(images) != count:
        raise ValueError(f"images has {len(images)} entries for {count} prompts")
    for i, im in enumerate(images):
        if im is not None and not all(hasattr(im, a) for a in ("pixel_values", "image_grid_thw")):
            raise TypeError(f"images[{i}] is a {type(im).__name__}: expected None or an ImageInputs"
                            " (pixel_values, image_grid_thw)")
    return list(images)


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

"""ModelRunner: the only place that builds tensors for a generation step.

It owns the KV pool, turns scheduled sequences into input ids, positions, slot mappings and block
tables, runs the model and samples: a decode step as one captured CUDA graph (embedding through the
sampler) over persistent input buffers (`DecodeInputs`), or eagerly. A step's one device-to-host
copy is its sampled token ids; their log-probs stay on the device until the run ends. A decode step
can be launched and read apart (`launch`, `read`), so that the next one is launched before it is
read (engine_loop.py): its input ids are then the draws still on the device.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..data.device_tensors import device_tensor
from ..model.config import ModelConfig
from ..model.causal_lm import CausalLM
from ..model.invariant import BatchInvariant, mask_logits
from ..model.moe import routing_trace
from ..model.primitives import DECODE
from .decode_graphs import DecodeGraphs
from .decode_inputs import DecodeInputs
from .image_prefill import ImageCache, span_positions
from .routing_record import RoutingRecorder
from ...kernels import SamplerWorkspace, model_backend, sample
from ...kernels.attention import AttentionMetadata, launch_splits, sequence_slot
from .sequence import Sequence


def kv_bytes_per_block(config: ModelConfig, dtype: torch.dtype, block_size: int,
                       tensor_parallel: int = 1) -> int:
    """K and V of every layer for one block of tokens, on one of `tensor_parallel` ranks (its share
    of the key/value heads)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_rank = 2 * config.num_layers * block_size * config.num_kv_heads // tensor_parallel
    return per_rank * config.head_dim * elem


def num_blocks_for_budget(kv_cache_memory, config: ModelConfig, dtype, block_size: int, device,
                          tensor_parallel: int = 1) -> int:
    """Blocks that fit `kv_cache_memory`: bytes (int), or a fraction in (0, 1] of free GPU memory
    (on one of `tensor_parallel` ranks, each holding its heads' share of every block)."""
    if isinstance(kv_cache_memory, float):
        if not 0 < kv_cache_memory <= 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} as a fraction must be in (0, 1]")
        if torch.device(device).type != "cuda":
            raise ValueError(
                "kv_cache_memory as a fraction of free GPU memory needs a CUDA device; "
                "give a number of bytes (int) instead")
        free, _ = torch.cuda.mem_get_info(device)
        kv_cache_memory = int(free * kv_cache_memory)
    if not isinstance(kv_cache_memory, int) or kv_cache_memory <= 0:
        raise ValueError(
            f"kv_cache_memory={kv_cache_memory!r} must be a positive int (bytes) or a float "
            "fraction of free GPU memory")
    return kv_cache_memory // kv_bytes_per_block(config, dtype, block_size, tensor_parallel)


class Launched(NamedTuple):
    """A step launched and not yet read: its sequences, its draws on the device ([rows] int64: the
    input of a step launched after it) and, where it is read later than at once, their host copy
    (on a GPU pinned, its copy queued behind the step, and `done` recorded after it); `first`: the
    log-prob slot of its first row (row i's at first + i)."""
    seqs: list
    tokens: torch.Tensor
    host: torch.Tensor | None
    done: object
    first: int


class ModelRunner:
    """Runs prefill and decode steps of `model` over a paged KV pool of `num_blocks` blocks.

    batch_invariant: run the forward, LM head and log-probs in that mode's primitives (its chunk
    must be block_size; decode steps are CUDA graphs of the mode's walk), so each token's log-prob
    is independent of the batch.
    fuse_decode_gemms: decode steps walk the decoder with `primitives.DECODE` (each norm inside the
    GEMM after it up to 16 rows, where the Triton kernels run); False: with `primitives.FORWARD`, as
    prefill does.
    record_routing: keep the experts an MoE model chose for every token (`self.routing`, a
    RoutingRecorder), decode graphs included.
    """

    # Decode batch sizes captured as CUDA graphs; a batch runs in the smallest one that fits. Every
    # 16 past 8, not powers of two: 129 rows would otherwise run (and pay for) the 256-row graph.
    GRAPH_BATCH_SIZES = (1, 2, 4, 8, *range(16, 513, 16))

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_num_seqs: int,
                 use_cuda_graphs: bool = True, batch_invariant: BatchInvariant | None = None,
                 fuse_decode_gemms: bool = True, record_routing: bool = False, device=None,
                 tensor_parallel=None):
        self.model = model
        self.fuse_decode_gemms = fuse_decode_gemms
        self.batch_invariant = batch_invariant
        self.config = model.config
        self.block_size = block_size
        param = next(model.parameters())
        # device: where the model runs when its resting shards are elsewhere (FSDP2's CPU offload).
        offloaded = device is not None and torch.device(device).type != param.device.type
        self.device, self.dtype = torch.device(device) if offloaded else param.device, param.dtype
        c = self.config
        # The model's TensorParallel (parallel/tensor_parallel.py) or None: this rank's slices,
        # its kv heads' cache, the logits gathered from the tensor ranks.
        self.tensor_parallel = tensor_parallel
        self.num_blocks = num_blocks
        # this rank's KV heads
        self.kv_heads = c.num_kv_heads // (tensor_parallel.size if tensor_parallel else 1)
        self.kv_pool = self.kv_caches = None
        self.allocate_kv_pool()
        self.max_blocks_per_seq = -(-c.max_model_len // block_size)
        # The sampled tokens' log-probs of the current run, step after step, kept on the
        # device for a trainer (a PPO rollout) to gather without a round trip through Python floats.
        self.logprob_buffer = torch.empty(1024, dtype=torch.float32, device=self.device)
        self.logprobs_kept = 0
        self.decode_inputs = DecodeInputs(max_num_seqs, self.max_blocks_per_seq, block_size,
                                          self.device)
        # The Triton sampler's key windows for every step's rows (40 KiB a row), made once: a decode
        # graph captures their pointers, and each call leaves them empty for the next.
        self.sampler_workspace = SamplerWorkspace(max_num_seqs, self.device)
        self.routing = RoutingRecorder(model, block_size, self.device) if record_routing else None
        # A decode step's choices [sparse layers, rows, k], written inside the step (and its graph).
        self.routing_out = None if self.routing is None else torch.zeros(
            self.routing.num_layers, max_num_seqs, self.routing.top_k, dtype=torch.int64,
            device=self.device)
        self._prefill_routing = None
        self.forwards = 0  # model forwards run (prefill, decode and speculative verify steps)
        # A vision-language model's tower outputs of the run, and the ids it never samples.
        self.images = ImageCache(model) if c.vision else None
        self.vision_ids = self._tensor(c.vision.vision_token_ids, torch.int64) if c.vision else None
        self.verify_workspace = None  # the sampler's windows for verify steps' rows
        # Host copies of the draws of decode steps read after the next is launched: two, for at
        # most two steps are launched and unread (pinned on a GPU: copied without a sync).
        self._staged = [torch.empty(max_num_seqs, dtype=torch.int64,
                                    pin_memory=self.device.type == "cuda") for _ in range(2)]
        self._staged_turn = 0
        self.graphs = None
        # The torch backend's decode is the reference's: it selects rows by masks (a host sync),
        # which no graph can capture; it runs eagerly.
        if use_cuda_graphs and self.device.type == "cuda" \
                and model_backend(torch.empty(0, device=self.device)) != "torch":
            self.graphs = DecodeGraphs(self, max_num_seqs)

    def allocate_kv_pool(self) -> None:
        """The paged KV pool (again after release_kv_pool): one tensor for all layers, [K/V, layer,
        block, slot in block, kv head, head dim]; its contents never outlive a run."""
        if self.kv_pool is None:
            c = self.config
            self.kv_pool = torch.empty(2, c.num_layers, self.num_blocks, self.block_size,
                                       self.kv_heads, c.head_dim, dtype=self.dtype,
                                       device=self.device)
            self.kv_caches = [(self.kv_pool[0, i], self.kv_pool[1, i]) for i in range(c.num_layers)]

    def release_kv_pool(self) -> bool:
        """Free the KV pool between runs (its memory goes back to the allocator, for the
        training phases); the next run allocates it again. Not with CUDA graphs: a captured decode
        step holds the pool's addresses, so the pool stays. Returns whether it was freed."""
        if self.graphs is not None:
            return False
        self.kv_pool = self.kv_caches = None
        return True

    @torch.inference_mode()
    def prefill_chunk(self, seq: Sequence) -> None:
        """A chunk of `seq`'s prompt that is not its last (Scheduler.prefill_chunk): its K/V
        written into the pool, nothing sampled."""
        self.allocate_kv_pool()
        self.forwards += 1
        input_ids, positions, meta, _, visual = self._prepare_packed(
            [(seq.block_table, seq.token_ids[:seq.chunk_end], seq.num_cached_tokens)], [seq])
        self.forward_step(input_ids, positions, meta, visual)

    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        """One step: the sampled token of each sequence, the step's one device-to-host copy. Their
        log-probs stay on the device, at logprob_buffer[logprobs_kept - len(seqs):logprobs_kept]."""
        return self.read(self.launch(seqs, is_prefill))

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool, staged: bool = False,
               previous: torch.Tensor | None = None) -> Launched:
        """One step launched (run's, without reading its draws); its log-probs kept at once.
        staged: its draws copied to the host behind it, to be read after another step is launched.
        previous: the draws [len(seqs)] on the device of a step of these sequences launched and not
        read (`draws_at`): this decode step is one token further, its input ids those draws (each
        row's slot taken before: BlockManager.append_slots(ahead=1))."""
        self.allocate_kv_pool()
        first = self.logprobs_kept
        if is_prefill:
            tokens, logprobs = self._prefill(seqs)
        else:
            tokens, logprobs = self._decode(seqs, previous)
        self._keep_logprobs(logprobs)
        if not staged:
            return Launched(seqs, tokens, None, None, first)
        host = self._staged[self._staged_turn][:len(seqs)]
        self._staged_turn ^= 1
        host.copy_(tokens, non_blocking=True)
        done = None
        if tokens.is_cuda:  # on the stream of the step's device (not the current device's)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(tokens.device))
        return Launched(seqs, tokens, host, done, first)

    def draws_at(self, step: Launched, rows: list[int]) -> torch.Tensor:
        """A launched step's draws on the device at these rows [len(rows)] (every row: the step's
        own tensor; else a gather by an index copied to the device)."""
        if len(rows) == len(step.seqs):
            return step.tokens
        return step.tokens.index_select(0, self._tensor(rows, torch.int64))

    @staticmethod
    def read(step: Launched) -> list[int]:
        """A launched step's draws on the host: its one wait for the device (for that step only,
        not for one launched after it)."""
        if step.host is None:
            return step.tokens.tolist()
        if step.done is not None:
            step.done.synchronize()
        return step.host.tolist()

    def keep_routing(self, spans: list[tuple[Sequence, int, int]], is_decode: bool) -> None:
        """With record_routing: the last forward's expert choices kept for the positions it
        forwarded (RoutingRecorder.keep's spans): a decode step's from the buffer its graph
        writes, any other forward's (prefill, a prompt's chunk, a verify step) from its trace."""
        self.routing.keep(spans, self.routing_out if is_decode else self._prefill_routing)

    def start_run(self) -> None:
        """A new run (LLM.run): the log-probs and routing records kept for the last one are
        dropped, and the decode inputs forget its sequences."""
        self.logprobs_kept = 0
        self.decode_inputs.forget()
        if self.routing is not None:
            self.routing.reset()
        if self.images is not None:
            self.images.clear()

    def kept_logprobs(self) -> list[float]:
        """Every log-prob kept since logprobs_kept was last reset, on the host (one copy)."""
        return self.logprob_buffer[:self.logprobs_kept].tolist()

    def _keep_logprobs(self, logprobs: torch.Tensor) -> None:
        """Append a step's log-probs [B] to logprob_buffer (doubled when full: amortized, no
        sync)."""
        end = self.logprobs_kept + logprobs.shape[0]
        if end > self.logprob_buffer.shape[0]:
            grown = self.logprob_buffer.new_empty(max(2 * self.logprob_buffer.shape[0], end))
            grown[:self.logprobs_kept].copy_(self.logprob_buffer[:self.logprobs_kept])
            self.logprob_buffer = grown
        self.logprob_buffer[self.logprobs_kept:end].copy_(logprobs)
        self.logprobs_kept = end

    def gather_logprobs(self, slots: list[int]) -> torch.Tensor:
        """The kept log-probs at these slots [len(slots)] fp32 (one index copied to the device)."""
        return self.logprob_buffer.index_select(0, self._tensor(slots, torch.int64))

    def forward_step(self, input_ids: torch.Tensor, positions: torch.Tensor,
                     meta: AttentionMetadata, visual=None) -> torch.Tensor:
        """The model's forward over the pages (the default kernels, or the batch-invariant walk):
        input_ids, positions [N] ([3, N]: M-RoPE's) -> final hidden states [N, hidden]; visual:
        image features at their rows (image_prefill.py). What a decode graph captures."""
        if self.batch_invariant is not None:
            return self.batch_invariant.paged_hidden(self.model, input_ids, positions, meta,
                                                     self.kv_caches, visual)
        # None: the model's FORWARD
        prims = DECODE if meta.is_decode and self.fuse_decode_gemms else None
        run = self.model.entry()  # persistent weights: past the root's FSDP hook
        if self.routing is None:
            return run(input_ids, positions, meta, self.kv_caches, prims=prims, visual=visual)
        # Decode: into routing_out, the buffer a graph writes; prefill (eager): the trace's tensors.
        with routing_trace(self.model, out=self.routing_out if meta.is_decode else None) as trace:
            hidden = run(input_ids, positions, meta, self.kv_caches, prims=prims, visual=visual)
        if not meta.is_decode:
            self._prefill_routing = torch.stack(
                [trace.chosen[layer] for layer in sorted(trace.chosen)])
        return hidden

    def decode_step(self, size: int, full_tables: bool):
        """The decode step over the first `size` rows of `decode_inputs`: embedding through the
        layers, the LM head and the sampler -> (tokens [size] int64, logprobs [size] fp32). What a
        decode graph captures (full_tables: it reads the block tables at their full width). Its
        attention splits come from the tables' capacity whatever their width, so an eager step and
        a graph of the same rows run the same launches."""
        x = self.decode_inputs.views(size, full_tables)
        splits = launch_splits(size, self.kv_heads, self.decode_inputs.width, self.block_size,
                               self.device)
        meta = AttentionMetadata(is_decode=True, slot_mapping=x.slot_mapping,
                                 context_lens=x.context_lens, block_tables=x.block_tables,
                                 decode_splits=splits)
        return self._sample(self.forward_step(x.input_ids, x.positions, meta), x.sampling)

    def _decode(self, seqs: list[Sequence], previous: torch.Tensor | None = None):
        """Each sequence's last token (previous: the draws of a step not yet read, one token
        further): its inputs written into the persistent buffers, then the graph of the smallest
        captured size that holds the batch, or the step run eagerly."""
        self.forwards += 1
        graphed = self.graphs is not None and len(seqs) <= self.graphs.max_batch
        size = self.graphs.size_for(len(seqs)) if graphed else len(seqs)
        self.decode_inputs.fill(seqs, size, full_tables=graphed, previous=previous)
        tokens, logprobs = (self.graphs.replay(size) if graphed
                            else self.decode_step(size, full_tables=False))
        return tokens[:len(seqs)], logprobs[:len(seqs)]

    def _prefill(self, seqs: list[Sequence]):
        """The new tokens of each sequence, from its first uncached one; samples after the last."""
        self.forwards += 1
        input_ids, positions, meta, last, visual = self._prepare_packed(
            [(s.block_table, s.token_ids, s.num_cached_tokens) for s in seqs], seqs)
        return self._sample(self.forward_step(input_ids, positions, meta, visual)[last],
                            self._prepare_sampling(seqs))

    @torch.inference_mode()
    def verify(self, seqs: list[Sequence], drafts: list[list[int]]) -> list[list[int]]:
        """Speculative decoding's step: one forward over each sequence's last token and its draft
        (its KV slots reserved), the target's token drawn at every position by the sampler (its
        counter-based noise, a function of the sequence's seed and the position), and each draft
        accepted while it equals those draws. Returns each sequence's emitted tokens: the accepted
        draft and the draw after it (1..len(draft) + 1 tokens), whose log-probs are kept.

        For a draft that is one token (a point mass), accepting it when the target's own draw equals
        it is the standard rule (accept with probability p(draft); on rejection a draw from the
        target with the draft removed, renormalized): the emitted tokens follow the target
        distribution exactly, and they are the tokens plain decoding draws from the same logits."""
        self.allocate_kv_pool()
        self.forwards += 1
        rows = [(s.block_table, s.token_ids + d, s.num_tokens - 1) for s, d in zip(seqs, drafts)]
        input_ids, positions, meta, _, visual = self._prepare_packed(rows, seqs)
        # [sum of (1 + draft), hidden]
        hidden = self.forward_step(input_ids, positions, meta, visual)
        spans = [(s, s.num_tokens + i) for s, d in zip(seqs, drafts) for i in range(len(d) + 1)]
        if self.verify_workspace is None or self.verify_workspace.rows < len(spans):
            self.verify_workspace = SamplerWorkspace(len(spans), self.device)
        sampling = self._prepare_sampling([s for s, _ in spans], [p for _, p in spans])
        tokens, logprobs = self._sample(hidden, sampling, self.verify_workspace)
        drawn, emitted, keep, at = tokens.tolist(), [], [], 0
        for d in drafts:
            n = 0
            while n < len(d) and drawn[at + n] == d[n]:
                n += 1
            emitted.append(drawn[at:at + n + 1])
            keep += range(at, at + n + 1)
            at += len(d) + 1
        self._keep_logprobs(logprobs[self._tensor(keep, torch.int64)])
        return emitted

    def _sample(self, hidden: torch.Tensor, sampling, workspace: SamplerWorkspace | None = None):
        """hidden [B, hidden] -> (tokens [B], logprobs [B]). The batch-invariant mode draws as usual
        (from its invariant fp32 logits) and takes the log-prob by its own log-softmax, the one the
        trainer's old log-probs use."""
        if self.batch_invariant is None:
            # [B, V] in the model's dtype: the fused sampler reads it as it is; an fp32 copy would
            # write and read the logits twice more.
            tp = self.tensor_parallel
            logits = tp.logits(self.model.lm_head, hidden) if tp else self.model.lm_head(hidden)
            if self.vision_ids is not None:  # never an image, video or vision boundary token
                logits = logits.index_fill(1, self.vision_ids, float("-inf"))
            return sample(logits, *sampling, workspace=workspace or self.sampler_workspace)
        mode = self.batch_invariant
        # [B, V] fp32, the vision tokens masked as the trainer's head_logprobs(masked=...) does
        logits = mask_logits(mode.logits(hidden, self.model.lm_head.weight),
                             () if self.vision_ids is None else self.vision_ids)
        tokens, _ = sample(logits, *sampling, workspace=self.sampler_workspace)
        return tokens, mode.sampler_logprobs(logits, tokens, sampling[0])

    def _tensor(self, data, dtype):
        return device_tensor(data, dtype, self.device)

    def _block_tables(self, tables: list[list[int]]):
        width = max(len(t) for t in tables)
        rows = [t + [-1] * (width - len(t)) for t in tables]
        return self._tensor(rows, torch.int32)  # [B, width]

    def _prepare_packed(self, rows: list[tuple[list[int], list[int], int]], seqs: list[Sequence]):
        """A packed forward over rows (block table, token ids, start), one per sequence of `seqs`:
        each row's tokens from `start` on, attending to its KV before it (in the pages) and to each
        other causally -> (input_ids, positions, meta, each row's last token, visual rows)."""
        input_ids, positions, slots, seqlens_q, seqlens_k = [], [], [], [], []
        for table, ids, start in rows:
            input_ids += ids[start:]
            positions += range(start, len(ids))
            slots += [sequence_slot(table, p, self.block_size) for p in range(start, len(ids))]
            seqlens_q.append(len(ids) - start)
            seqlens_k.append(len(ids))
        cu_q = self._tensor([0] + seqlens_q, torch.int32).cumsum(0, dtype=torch.int32)
        cu_k = self._tensor([0] + seqlens_k, torch.int32).cumsum(0, dtype=torch.int32)
        meta = AttentionMetadata(
            is_decode=False, seqlens_q=seqlens_q, seqlens_k=seqlens_k, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, slot_mapping=self._tensor(slots, torch.int64),
            block_tables=(self._block_tables([table for table, _, _ in rows])
                          if seqlens_q != seqlens_k else None))
        last = cu_q[1:] - 1  # index of each sequence's last token in the packed batch
        visual, spans = None, [(s, start, len(ids)) for s, (_, ids, start) in zip(seqs, rows)]
        if self.images is not None:  # M-RoPE's [3, N] positions, the image features
            positions = [sum(axis, []) for axis in zip(*(span_positions(*x) for x in spans))]
            visual = self.images.visual_rows(spans, self.device)
        return (self._tensor(input_ids, torch.int64), self._tensor(positions, torch.int64), meta,
                last, visual)

    def _prepare_sampling(self, seqs: list[Sequence], draw_positions: list[int] | None = None):
        """The sampler's per-row tensors; a row draws the token at its draw position (default: the
        sequence's next, num_tokens)."""
        ps = [s.params for s in seqs]
        return (self._tensor([p.temperature for p in ps], torch.float32),
                self._tensor([p.top_k for p in ps], torch.int64),
                self._tensor([p.top_p for p in ps], torch.float32),
                self._tensor([s.seed for s in seqs], torch.int64),
                self._tensor(draw_positions or [s.num_tokens for s in seqs], torch.int64),
                self._tensor([p.min_p for p in ps], torch.float32))

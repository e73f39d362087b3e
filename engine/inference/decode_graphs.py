"""CUDA graphs of a ModelRunner's whole decode step, one per captured batch size, replayed over its
persistent input buffers (decode_inputs.py)."""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch


def capture_error_mode() -> str:
    """The stream-capture mode of a decode graph: "thread_local" while a process group is up (NCCL's
    watchdog thread queries its events during our capture, which "global" turns into a capture
    failure), else "global" (any thread's unsafe call during the capture is an error)."""
    dist = torch.distributed
    return "thread_local" if dist.is_available() and dist.is_initialized() else "global"


class DecodeGraphs:
    """CUDA graphs of the whole decode step (`ModelRunner.decode_step`: embedding, layers, final
    norm, LM head and sampler) at GRAPH_BATCH_SIZES, reading the runner's `DecodeInputs` device
    buffers and writing tokens and log-probs [max_batch] into buffers of their own.

    The inputs' padding rows carry slot -1 (nothing written) and context length 0 (nothing read), so
    a batch of 5 replays the graph of 8 and keeps the first 5 rows. `capture=False` keeps the same
    buffers and padding but replays by running the step eagerly: how the tests check this
    bookkeeping on a machine without CUDA.
    """

    def __init__(self, runner, max_num_seqs: int, capture: bool = True):
        self.runner = runner
        sizes = [b for b in runner.GRAPH_BATCH_SIZES if b <= max_num_seqs]
        if not sizes or sizes[-1] < max_num_seqs <= runner.GRAPH_BATCH_SIZES[-1]:
            sizes.append(max_num_seqs)
        self.max_batch = sizes[-1]
        self.tokens = torch.zeros(self.max_batch, dtype=torch.int64, device=runner.device)
        self.logprobs = torch.zeros(self.max_batch, dtype=torch.float32, device=runner.device)
        self.graphs = {}
        self.pool = None
        # largest first: smaller graphs reuse its pool
        self._capture(sorted(sizes, reverse=True), capture)

    def _step(self, size: int):
        tokens, logprobs = self.runner.decode_step(size, full_tables=True)
        self.tokens[:size] = tokens
        self.logprobs[:size] = logprobs

    @torch.inference_mode()
    def _capture(self, sizes, capture: bool):
        for b in sizes:
            step = functools.partial(self._step, b)
            step()  # warm-up on the padding rows: Triton kernels compile outside the capture
            if not capture:
                self.graphs[b] = SimpleNamespace(replay=step)
                continue
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, self.pool, capture_error_mode=capture_error_mode()):
                step()
            self.pool = graph.pool()
            self.graphs[b] = graph
        if capture:
            torch.cuda.synchronize()

    def size_for(self, batch: int) -> int:
        """The smallest captured size that holds `batch` rows."""
        return min(s for s in self.graphs if s >= batch)

    def replay(self, size: int):
        """Run the graph of `size` rows on the inputs filled for it -> (tokens, logprobs) [size]."""
        self.graphs[size].replay()
        return self.tokens[:size], self.logprobs[:size]

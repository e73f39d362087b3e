"""train.activation_offload: the tensors autograd keeps between checkpointed layers (each layer's
input and residual stream) rest in CPU memory from the forward to the backward.

torch's saved-tensor hooks do the moving: `pack` copies a saved tensor into a fresh CPU buffer
(pinned on CUDA, the copy on a side stream so the forward does not wait for it), `unpack` brings it
back when the backward's recompute of its layer asks for it. The backward walks the layers in
reverse: unpacking layer i's tensors starts the copy of layer i - 1's on the side stream, so it
overlaps layer i's recompute and backward (prefetch). The values are copied, never changed: the
gradients equal those without offload bit for bit. On the CPU the copy is a copy within CPU memory
(the same code path, nothing saved), which is what the tests check.
"""
from __future__ import annotations

import torch


class ActivationOffload:
    """One forward's saved tensors in CPU memory (see the module docstring); `hooks()` is the
    context in which the forward runs. `bytes_moved` counts the bytes copied to CPU memory."""

    def __init__(self):
        # Per packed tensor: [its CPU buffer, its device, its prefetched device copy or None].
        self.saved: list = []
        self.bytes_moved = 0
        self._stream = None

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _side_stream(self, device):
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _pack(self, tensor: torch.Tensor):
        if isinstance(tensor, torch.nn.Parameter) or tensor.numel() == 0:
            return tensor  # the weights stay where they are; empty tensors cost nothing
        cuda = tensor.is_cuda
        buffer = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=cuda)
        if cuda:  # copied on the side stream once the forward has written it; kept alive until then
            stream = self._side_stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                buffer.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)
        else:
            buffer.copy_(tensor)
        self.bytes_moved += tensor.numel() * tensor.element_size()
        self.saved.append([buffer, tensor.device, None])
        return len(self.saved) - 1

    def _unpack(self, handle):
        if isinstance(handle, torch.Tensor):
            return handle
        entry = self.saved[handle]
        if entry[1].type == "cuda" and handle > 0:
            self._prefetch(handle - 1)  # the layer before: the backward's next
        return self._fetch(handle)

    def _prefetch(self, handle: int):
        entry = self.saved[handle]
        if entry[2] is None:
            stream = self._side_stream(entry[1])
            with torch.cuda.stream(stream):
                entry[2] = entry[0].to(entry[1], non_blocking=True)

    def _fetch(self, handle: int) -> torch.Tensor:
        buffer, device, prefetched = self.saved[handle]
        if device.type != "cuda":
            return buffer
        if prefetched is None:
            self._prefetch(handle)
            prefetched = self.saved[handle][2]
        torch.cuda.current_stream(device).wait_stream(self._side_stream(device))
        prefetched.record_stream(torch.cuda.current_stream(device))
        self.saved[handle][2] = None  # the recompute holds it now, and frees it with its layer
        return prefetched

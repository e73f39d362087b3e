"""Small index tensors built on the host and sent to the device without waiting for it.

`torch.tensor(data, device=cuda)` copies from pageable memory with non_blocking=False, which
synchronizes the stream: the host waits for every kernel already queued (a training step's whole
backward) before it can launch the next one, a sync no dispatcher-level counter sees. A pinned
staging tensor and a non-blocking copy enqueue the copy instead (the caching host allocator keeps
the pinned block until the copy has run), so the host keeps launching ahead of the GPU.
"""
from __future__ import annotations

import numpy as np
import torch


def device_tensor(data, dtype: torch.dtype, device) -> torch.Tensor:
    """Python data (a list of numbers, nested lists, a range, a numpy array) as a `dtype` tensor
    on `device`, its host-to-device copy enqueued (pinned and non-blocking on CUDA; elsewhere a
    plain tensor)."""
    if device is None or torch.device(device).type != "cuda":  # None: the default device
        return torch.as_tensor(data, dtype=dtype, device=device)  # an array's own memory
    host = torch.as_tensor(data, dtype=dtype, device="cpu").pin_memory()
    return host.to(device, non_blocking=True)


def copy_from_host(target: torch.Tensor, data: np.ndarray) -> None:
    """An existing tensor (a CUDA graph's input buffer) overwritten with a host array of its
    shape, the copy enqueued as device_tensor's (pinned and non-blocking on CUDA)."""
    host = torch.as_tensor(data, dtype=target.dtype)
    target.copy_(host.pin_memory() if target.is_cuda else host, non_blocking=target.is_cuda)


def last_rows(seqlens: list[int], device) -> torch.Tensor:
    """Each packed sequence's last row [S] int64 (the cumulative lengths less one), sent once."""
    return device_tensor(np.cumsum(seqlens, dtype=np.int64) - 1, torch.int64, device)


def host_positions(seqlens: list[int]) -> np.ndarray:
    """Each token's position in its sequence [N] int64 (restarting at 0 in each) of packed
    sequences of these lengths, on the host."""
    ends = np.cumsum(seqlens, dtype=np.int64)
    total = int(ends[-1]) if len(ends) else 0  # no sequences: no positions
    return np.arange(total, dtype=np.int64) - np.repeat(ends - seqlens, seqlens)


def host_cu_seqlens(seqlens: list[int]) -> np.ndarray:
    """The sequences' boundaries [S + 1] int32 (0, then the cumulative lengths), on the host."""
    return np.concatenate(([0], np.cumsum(seqlens))).astype(np.int32)


def packed_positions(seqlens: list[int], device) -> torch.Tensor:
    """host_positions on `device`, sent in one copy."""
    return device_tensor(host_positions(seqlens), torch.int64, device)


def packed_cu_seqlens(seqlens: list[int], device) -> torch.Tensor:
    """host_cu_seqlens on `device`, sent once."""
    return device_tensor(host_cu_seqlens(seqlens), torch.int32, device)

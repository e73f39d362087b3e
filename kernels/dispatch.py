"""Backend choice for every fused op: which implementation runs for a given tensor.

Backends:
  "triton"  our fused Triton kernels; runs on CUDA tensors, and on CPU tensors when the Triton
            interpreter is on (``TRITON_INTERPRET=1``, how CI tests the kernels).
  "cuda"    our hand-written CUDA kernels (csrc/, the optional extension ``fusedrl.kernels._C``,
            see ``fusedrl.kernels.cuda_ext``); CUDA tensors only. Asking for it where the extension
            is not built raises a RuntimeError saying how to build it. linear_token_logprobs and
            masked_whiten have no kernel of their own there and run as on "triton".
  "torch"   the plain PyTorch reference composition (``kernels.reference``), differentiated by
            autograd. Works everywhere; it is the oracle and the eager baseline, and the only
            backend "auto" picks where triton is not installed.

Resolution order: the innermost ``use_backend(...)`` context of the calling thread, else the
``FUSEDRL_BACKEND`` environment variable, else "auto": on CUDA tensors, with the extension built,
the backend measured fastest for the op at that size (AUTO_CUDA_UP_TO, from the H100 run of
kernels/BACKENDS.md); otherwise Triton where it can run, torch elsewhere.

This is the one backend decider; nothing else reads the environment or tests devices to pick an
implementation, but for attention's choice of kernel (attention/backend.py), which builds on
model_backend and adds what only attention needs to know (flash-attn installed, torch's varlen
kernel checked, the page size). Its questions:
  backend_for(x, op)         an op's backend ("triton", "cuda", "torch")
  model_backend(x)           the model-scale paths' backend ("triton" or "torch"): the decoder
                             walk's norms, RoPE and SiLU*up, norm_linear, paged attention, the
                             sampler and the exact (batch-invariant) mode's ops; fused_for_model(x)
                             asks the same
  grouped_gemm_path(x, w)    the MoE grouped GEMM's ("grouped_mm", "triton" or "loop"), see its
                             docstring

The override stack is thread-local (no process-wide mutable state) and is a plain list, which
torch.compile can read and guard on (it cannot trace ``contextvars``). Under torch.compile the
environment variable is read once, at trace time.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Optional

import torch

from . import cuda_ext
from .triton_compat import TRITON_AVAILABLE

BACKENDS = ("triton", "cuda", "torch")
# "auto" on CUDA tensors with the extension built: the op runs on "cuda" up to this many elements
# of its main input (None: at every size), on "triton" above; ops not listed stay on "triton".
# Measured on an H100 (kernels/BACKENDS.md has the figures and their run): CUDA won every
# 256 x 2048 row (0.5M elements) and token_logprobs at 4096 x 32000 and 16384 x 151936; at
# 8192 x 2048 (16.8M) Triton won gae and kl_penalty, CUDA the losses. The crossover between the two
# sizes is unmeasured: 2M (1024 x 2048) is the side of the smaller one.
AUTO_CUDA_UP_TO = {"token_logprobs": None, "gae": 1 << 21, "kl_penalty": 1 << 21,
                   "ppo_policy_loss": None, "ppo_value_loss": None}
_CHOICES = ("auto",) + BACKENDS


class _BackendStack(threading.local):
    def __init__(self) -> None:
        self.names: list[str] = []


_stack = _BackendStack()


def _check_name(name: str, source: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {_CHOICES}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the ``with`` block on backend ``name`` ("auto" or one of BACKENDS).

    "cuda" loads the extension on entry, so a missing build fails here, before any op runs.
    """
    if _check_name(name, "use_backend") == "cuda":
        cuda_ext.require()
    _stack.names.append(name)
    try:
        yield
    finally:
        _stack.names.pop()


def triton_interpreting() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors allowed)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    """The backend asked for by the innermost ``use_backend`` or ``FUSEDRL_BACKEND`` ("auto" if
    none)."""
    if _stack.names:
        return _stack.names[-1]
    return _check_name(os.environ.get("FUSEDRL_BACKEND", "auto"), "FUSEDRL_BACKEND")


def auto_backend(op: Optional[str], numel: int, *, on_cuda: bool, cuda_built: bool,
                 triton_ok: bool) -> str:
    """What "auto" picks for ``op`` (a key of AUTO_CUDA_UP_TO, or None: no preference) on an input
    of ``numel`` elements."""
    if on_cuda and cuda_built and op in AUTO_CUDA_UP_TO:
        limit = AUTO_CUDA_UP_TO[op]
        if limit is None or numel <= limit:
            return "cuda"
    return "triton" if triton_ok else "torch"


def _cuda_built() -> bool:
    # The first eager call tries to load the extension; a trace only reads what that found (the
    # loader's imports would break the graph).
    return cuda_ext.is_loaded() if torch.compiler.is_compiling() else cuda_ext.is_available()


def backend_for(x: torch.Tensor, op: Optional[str] = None, *,
                interpret_on_auto: bool = True) -> str:
    """The backend that will run an op whose main input is ``x``: "triton", "cuda" or "torch".
    ``op`` names the op for "auto"'s measured choice (AUTO_CUDA_UP_TO). ``interpret_on_auto``
    False: "auto" keeps CPU tensors on torch even under TRITON_INTERPRET=1 (fused_for_model).

    Raises RuntimeError when "triton" or "cuda" is requested for a tensor it cannot run on, or
    "cuda" where the extension is not built.
    """
    name = requested_backend()
    if name == "cuda":
        cuda_ext.require()
        if not x.is_cuda:
            raise RuntimeError(f"backend 'cuda' needs CUDA tensors; got a tensor on {x.device}")
        return name
    triton_ok = TRITON_AVAILABLE and (x.is_cuda or triton_interpreting())
    if name == "auto":
        return auto_backend(op, x.numel(), on_cuda=x.is_cuda,
                            cuda_built=x.is_cuda and _cuda_built(),
                            triton_ok=triton_ok and (x.is_cuda or interpret_on_auto))
    if name == "triton" and not TRITON_AVAILABLE:
        raise RuntimeError("backend 'triton' is unavailable: triton is not installed")
    if name == "triton" and not triton_ok:
        raise RuntimeError(
            f"backend 'triton' needs CUDA tensors or TRITON_INTERPRET=1; got a tensor on {x.device}"
        )
    return name


def model_backend(x: torch.Tensor) -> str:
    """The backend of the model-scale paths (a decoder's norms, RoPE and SiLU*up, norm_linear, paged
    attention, the sampler, the exact mode's ops) for tensors like ``x``: "triton" or "torch".

    backend_for's choice, with two differences: "auto" keeps CPU tensors on torch even under
    TRITON_INTERPRET=1, because a whole forward or generation in the interpreter takes minutes
    (tests that want it ask by name, ``use_backend("triton")``); and "cuda" gives "triton", since
    these paths have no CUDA twin (as linear_token_logprobs and masked_whiten run on "cuda").
    """
    return "torch" if backend_for(x, interpret_on_auto=False) == "torch" else "triton"


def fused_for_model(x: torch.Tensor) -> bool:
    """Whether the model-scale paths run our fused kernels for tensors like ``x``
    (model_backend)."""
    return model_backend(x) == "triton"


# Compute-capability majors whose bf16 grouped_mm runs torch's CUTLASS kernel (torch 2.11's
# GroupedBlas.cpp: sm_90 and sm_100); elsewhere its fallback copies the group offsets to the host.
GROUPED_MM_FAST_MAJORS = (9, 10)
# torch's grouped GEMM, or None on a torch build without it (not every version has it public).
TORCH_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None)


def grouped_mm_path(device_type: str, dtype: torch.dtype, capability: Optional[tuple],
                    has_grouped_mm: bool = True, *, aligned: bool = True,
                    compiling: bool = False) -> str:
    """What `grouped_gemm_path` picks for inputs of `dtype` on `device_type` (capability (major,
    minor) on CUDA) with torch's grouped_mm there or not: "grouped_mm" where it reads nothing on
    the host (bf16 on sm_90/sm_100; the CPU where it runs, below), "triton" (model/grouped_gemm.py)
    on any other GPU or dtype, whose fallback would sync per call and fail inside CUDA-graph
    capture, and on any GPU of a torch without it; "loop" (reference.grouped_linear) on the CPU
    where grouped_mm would fail. On the CPU grouped_mm takes fp32, bf16 and fp16 rows of whole 16
    bytes (`aligned`: the weight's in and out features), and under torch.compile (`compiling`: its
    fake kernel) bf16 only; the loop takes every dtype and size. GPUs ignore `aligned` and
    `compiling`: their grouped_mm path refuses unaligned sizes in one line."""
    if device_type != "cuda":
        runs = dtype == torch.bfloat16 or (not compiling
                                           and dtype in (torch.float32, torch.float16))
        return "grouped_mm" if has_grouped_mm and aligned and runs else "loop"
    fast = (has_grouped_mm and dtype == torch.bfloat16 and capability is not None
            and capability[0] in GROUPED_MM_FAST_MAJORS)
    return "grouped_mm" if fast else "triton"


def grouped_gemm_path(x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> str:
    """The MoE grouped GEMM's implementation for inputs like ``x`` (and ``weight`` [E, O, K], whose
    sizes the CPU's choice reads; None: taken as whole 16-byte rows): "grouped_mm" (torch's
    F.grouped_mm), "triton" (ours) or "loop", by grouped_mm_path. Not an op backend: whatever
    backend is asked for, a CUDA run must not copy its offsets to the host (the torch backend's
    oracle is the CPU's grouped_mm)."""
    capability = torch.cuda.get_device_capability(x.device) if x.is_cuda else None
    aligned = weight is None or not any(size * x.element_size() % 16 for size in weight.shape[1:])
    return grouped_mm_path(x.device.type, x.dtype, capability, TORCH_GROUPED_MM is not None,
                           aligned=aligned, compiling=torch.compiler.is_compiling())


def sync_checks_enabled(x: torch.Tensor) -> bool:
    """Whether to run input checks that read tensor values (a host sync on GPU).

    Always on for CPU tensors. On GPU they are off (a sync per call would stall the stream and break
    CUDA-graph capture) unless ``FUSEDRL_SYNC_CHECKS=1``, and off during a capture whatever it says
    (a host read there fails the capture). They are skipped while torch.compile traces
    (data-dependent Python branches would break the graph). Without them the kernels still never
    read out of bounds and turn an invalid label into a NaN output.
    """
    if torch.compiler.is_compiling():
        return False
    if x.device.type == "cpu":
        return True
    if os.environ.get("FUSEDRL_SYNC_CHECKS", "0") != "1":
        return False
    return not (x.is_cuda and torch.cuda.is_current_stream_capturing())

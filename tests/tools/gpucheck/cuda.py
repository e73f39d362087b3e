"""The CUDA backend's kernels (csrc/*.cu) compiled for sm_80 and sm_90 with the machine's nvcc,
as .ci/compile_cuda compiles them, and their resource usage read from the objects."""
from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .compile import tool
from .occupancy import occupancy

ROOT = Path(__file__).resolve().parents[3]
# torch's BuildExtension flags (see .ci/compile_cuda).
NVCC_FLAGS = ["-std=c++17", "-O3", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
              "--expt-relaxed-constexpr"]
_FUNCTION = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")
# Warps per block of the launches in csrc/: kThreads = 256, gae's kWarpsPerBlock = 4.
WARPS = {"gae.cu": 4}
DEFAULT_WARPS = 8


def cuda_rows(archs=(80, 90)) -> list[dict]:
    """One row per (kernel, arch): registers, spills, static shared memory, occupancy.
    Empty when nvcc is not on PATH."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return []
    jobs = [(cu, arch) for cu in sorted((ROOT / "csrc").glob("*.cu")) for arch in archs]
    with tempfile.TemporaryDirectory() as work, ThreadPoolExecutor(4) as pool:
        per_job = pool.map(lambda job: _compile(nvcc, *job, Path(work)), jobs)
        return [row for rows in per_job for row in rows]


def _compile(nvcc: str, cu: Path, arch: int, work: Path) -> list[dict]:
    cubin = work / f"{cu.stem}.sm_{arch}.cubin"
    subprocess.run([nvcc, *NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", str(cu), "-o", str(cubin)],
                   check=True, capture_output=True)
    usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", str(cubin)], check=True,
                           capture_output=True, text=True).stdout
    return [{"file": cu.name, "kernel": _demangle(name), "arch": f"sm_{arch}", "registers": int(reg),
             "stack_bytes": int(stack), "static_shared": int(shared), "spill_bytes": int(local),
             "occupancy": occupancy(arch, int(reg), int(shared), WARPS.get(cu.name, DEFAULT_WARPS))}
            for name, reg, stack, shared, local in _FUNCTION.findall(usage)]


def _demangle(name: str) -> str:
    out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    return out or name

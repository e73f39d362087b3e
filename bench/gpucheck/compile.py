"""Compile one recorded launch ahead of time, as the JIT would specialize it, and read the cubin.

Arguments are rebuilt from the record (a CPU tensor of the recorded dtype at the recorded address
offset modulo 16, ints and floats as recorded) and bound by Triton's own binder for the target,
so pointer and int divisibility and the ints equal to 1 are specialized exactly as at run time.
Runs without TRITON_INTERPRET: the kernels must be real JITFunctions.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import tempfile
from pathlib import Path

import torch

from .occupancy import occupancy
from .streams import SHAPE_ARGS, STREAMS

_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s")
_SASS = re.compile(r"\b((?:LDG|STG)(?:\.[A-Z0-9_]+)*)")


def tool(name: str) -> str:
    """ptxas / cuobjdump as shipped in the triton wheel."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _argument(desc):
    if "tensor" in desc:
        dtype = getattr(torch, desc["tensor"])
        size = torch.empty(0, dtype=dtype).element_size()
        buffer = torch.empty(64 // size + 16, dtype=dtype)
        # The buffer is >= 64-byte aligned: an offset of misalign bytes gives the recorded address class.
        return buffer[desc["misalign"] // size:]
    return next(iter(desc.values()))


def jit_function(kernel: str):
    module, name = kernel.split(":")
    return getattr(importlib.import_module(module), name)


def compile_launch(record: dict, arch: int):
    """The CompiledKernel of `record` for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(record["kernel"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_argument(desc) for _, desc in record["args"]]
    kwargs = {"debug": False, **record["options"]}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def ptx_widths(ptx: str) -> dict:
    """{(kind, file, line): sorted access widths in bits} from the PTX's .loc-annotated accesses."""
    files, loc, out = {}, None, {}
    for text in ptx.splitlines():
        if m := _FILE.match(text):
            files[m[1]] = m[2]
    for text in ptx.splitlines():
        if m := _LOC.match(text):
            loc = (files.get(m[1], "?"), int(m[2]))
        elif (m := _ACCESS.search(text)) and loc:
            width = int(m[2] or 1) * int(m[3])
            out.setdefault((m[1],) + loc, set()).add(width)
    return {k: sorted(v) for k, v in out.items()}


def stream_widths(kernel_name: str, fn, ptx: str) -> dict:
    """{stream: {"kind", "widths"}} for the kernel's named streams (widths in bits, all accesses
    of the stream's source lines; [] if the compiler removed them)."""
    source_file = fn.fn.__code__.co_filename
    lines = Path(source_file).read_text().splitlines()
    widths = ptx_widths(ptx)
    out = {}
    for stream, (kind, text) in STREAMS.get(kernel_name, {}).items():
        found = set()
        for number, line in enumerate(lines, 1):
            if text in line:
                found.update(widths.get((kind, source_file, number), []))
        out[stream] = {"kind": kind, "widths": sorted(found)}
    return out


def cubin_resources(cubin: bytes) -> dict:
    """Registers, spill (local) bytes, static shared memory and LDG/STG instruction kinds."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([tool("cuobjdump"), "--dump-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    counts = {}
    for m in _SASS.finditer(sass):
        counts[m[1]] = counts.get(m[1], 0) + 1
    return {"registers": int(fields.get("REG", 0)), "spill_bytes": int(fields.get("LOCAL", 0)),
            "stack_bytes": int(fields.get("STACK", 0)), "static_shared": int(fields.get("SHARED", 0)),
            "sass_global": dict(sorted(counts.items()))}


def aligned_launch(record: dict) -> bool:
    """Every tensor 16-byte aligned and every shape argument of the kernel a multiple of 16."""
    name = record["kernel"].split(":")[1]
    shape_args = SHAPE_ARGS.get(name, ())
    return all(desc.get("misalign", 0) == 0 for _, desc in record["args"]) and all(
        desc["int"] % 16 == 0 for arg, desc in record["args"] if arg in shape_args)


def analyze(record: dict, arch: int) -> dict:
    """The report row of one launch on sm_`arch`: compiled or error, resources, streams, occupancy."""
    name = record["kernel"].split(":")[1]
    num_warps = record["options"].get("num_warps", 4)
    row = {"kernel": name, "arch": f"sm_{arch}", "num_warps": num_warps,
           "config": {k: v for k, v in record["options"].items() if k != "num_warps"},
           "args": {arg: desc for arg, desc in record["args"] if "int" in desc or "tensor" in desc},
           "aligned": aligned_launch(record)}
    try:
        compiled = compile_launch(record, arch)
    except Exception as e:  # a compile error is a result of the check, reported per launch
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return row
    row.update(cubin_resources(compiled.asm["cubin"]))
    row["shared_bytes"] = compiled.metadata.shared
    row["streams"] = stream_widths(name, jit_function(record["kernel"]), compiled.asm["ptx"])
    row["occupancy"] = occupancy(arch, row["registers"], row["shared_bytes"], num_warps)
    return row

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

from fusedrl.kernels.ahead_of_time import TargetDriver, argument, jit_function  # noqa: F401

from .occupancy import occupancy
from .streams import SHAPE_ARGS, STREAMS

_PARAM = re.compile(r"ld\.param\.\w+\s+(%rd\d+),\s*\[\w+_param_(\d+)\]")
_ADDRESS = re.compile(r"\[\s*(%rd\d+)")
_REG = re.compile(r"%[a-z]+\d+")
_ACCESS = re.compile(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s")
# Asynchronous global -> shared copies (software-pipelined tile loads): the global address is the
# second operand, the byte count the third.
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[\s*(%rd\d+)[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_SASS = re.compile(r"\b((?:LDG|STG)(?:\.[A-Z0-9_]+)*)")
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")  # tensor-core instructions: sm_90's warpgroup MMA, sm_80's MMA


def tool(name: str) -> str:
    """ptxas / cuobjdump as shipped in the triton wheel."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_launch(record: dict, arch: int):
    """(CompiledKernel, signature) of `record` for sm_`arch`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = jit_function(record["kernel"])
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [argument(desc) for _, desc in record["args"]]
    kwargs = {"debug": False, **record["options"]}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__), signature


def compile_specialization(data: str, arch: int):
    """The CompiledKernel of one compile a GPU process recorded (Triton's own serialized
    specialization, as bench/triton_compiles.py records it), compiled for sm_`arch` by Triton's own
    `JITFunction.preload` on a TargetDriver. The recorded libdevice path is the GPU machine's: it
    is dropped, and the options take this Triton's (the same bytes, which is what the key hashes)."""
    import json
    from triton.runtime import driver

    spec = json.loads(data)
    spec["options"].pop("extern_libs", None)
    module, _, name = spec["name"].rpartition(".")
    fn = getattr(importlib.import_module(module), name)
    spec = with_current_arguments(spec, fn.arg_names)
    driver.set_active(TargetDriver(arch))
    return fn.preload(json.dumps(spec))


# A GPU process never runs the interpreter: a record taken before a kernel gained the switch to
# the interpreter's stand-ins (tile_dot.dot_nt's INTERPRETED) is the same launch with it False.
GPU_CONSTANTS = {"INTERPRETED": False}


def with_current_arguments(spec: dict, arg_names: list[str]) -> dict:
    """A recorded specialization over the kernel's arguments as they are now: the constants of
    GPU_CONSTANTS it lacks added, every index moved to its argument's place. ValueError when it
    lacks any other argument or names one the kernel no longer takes (a stale record)."""
    recorded = list(spec["signature"])
    missing = [n for n in arg_names if n not in spec["signature"]]
    unknown = [n for n in recorded if n not in arg_names]
    if unknown or any(n not in GPU_CONSTANTS for n in missing):
        raise ValueError(f"{spec['name']}: recorded with other arguments "
                         f"(gone: {unknown}, new: {missing})")
    if not missing:
        return spec
    place = {i: arg_names.index(n) for i, n in enumerate(recorded)}
    moved = lambda keys: [[place[k[0]], *k[1:]] for k in keys]  # noqa: E731
    added = [[arg_names.index(n)] for n in missing]
    constants = [*zip(moved(spec["constant_keys"]), spec["constant_vals"]),
                 *zip(added, (GPU_CONSTANTS[n] for n in missing))]
    attrs = list(zip(moved(spec["attrs_keys"]), spec["attrs_vals"]))
    if any(k in spec["attrs_keys"] for k in spec["constant_keys"]):  # Triton 3.9: [] per constexpr
        attrs += [(k, []) for k in added]
    # in argument order, as Triton's binder lists them (the order enters the key)
    constants.sort(key=lambda kv: kv[0])
    attrs.sort(key=lambda kv: kv[0])
    return {**spec,
            "signature": {n: spec["signature"].get(n, "constexpr") for n in arg_names},
            "constant_keys": [k for k, _ in constants], "constant_vals": [v for _, v in constants],
            "attrs_keys": [k for k, _ in attrs], "attrs_vals": [v for _, v in attrs]}


def ptx_accesses(ptx: str) -> list[tuple[str, int, set]]:
    """(kind "ld"/"st", width in bits, PTX parameter indices the address derives from) of every
    global access (cp.async copies to shared memory count as loads), by forward data flow from each `ld.param` through the instructions that
    compute addresses (any instruction's first register is its destination)."""
    origins, out = {}, []
    for text in ptx.splitlines():
        if m := _PARAM.search(text):
            origins[m[1]] = {int(m[2])}
        elif m := _CP_ASYNC.search(text):
            out.append(("ld", int(m[2], 0) * 8, origins.get(m[1], set())))
        elif m := _ACCESS.search(text):
            address = _ADDRESS.search(text)
            out.append((m[1], int(m[2] or 1) * int(m[3]), origins.get(address[1], set()) if address else set()))
        elif (regs := _REG.findall(text)) and regs[0].startswith("%rd"):
            origins[regs[0]] = set().union(*(origins.get(r, set()) for r in regs[1:]))
    return out


def stream_widths(kernel_name: str, signature: dict, ptx: str) -> dict:
    """{stream: {"kind", "widths"}}: the access widths (bits) through each named stream's pointer;
    [] if there are none (the compiler removed them)."""
    params = [name for name, ty in signature.items() if ty != "constexpr"]  # PTX parameter order
    accesses = ptx_accesses(ptx)
    out = {}
    for stream, (kind, pointer) in STREAMS.get(kernel_name, {}).items():
        index = params.index(pointer)
        widths = {w for k, w, src in accesses if k == kind and index in src}
        out[stream] = {"kind": kind, "widths": sorted(widths)}
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
    counts, mma = {}, {}
    for m in _SASS.finditer(sass):
        counts[m[1]] = counts.get(m[1], 0) + 1
    for m in _MMA.finditer(sass):
        mma[m[1]] = mma.get(m[1], 0) + 1
    return {"registers": int(fields.get("REG", 0)), "spill_bytes": int(fields.get("LOCAL", 0)),
            "stack_bytes": int(fields.get("STACK", 0)), "static_shared": int(fields.get("SHARED", 0)),
            "sass_global": dict(sorted(counts.items())), "mma": dict(sorted(mma.items()))}


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
        compiled, signature = compile_launch(record, arch)
    except Exception as e:  # a compile error is a result of the check, reported per launch
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return row
    row.update(cubin_resources(compiled.asm["cubin"]))
    row["shared_bytes"] = compiled.metadata.shared
    row["streams"] = stream_widths(name, signature, compiled.asm["ptx"])
    row["occupancy"] = occupancy(arch, row["registers"], row["shared_bytes"], num_warps)
    return row

"""The Triton kernels a bench run on a GPU compiles (or loads from TRITON_CACHE_DIR), recorded so
that the next visit can carry them compiled: one JSON line per kernel and process, with Triton's
cache hash and its own serialized specialization (what `JITFunction.preload` reads), which
tests/tools/triton_prebuild.py compiles on a CPU machine for the next visit's cache. A visit's
record against the manifest of the cache it carried gives that cache's hits.

The file is named by FUSEDRL_TRITON_COMPILES, which child processes inherit (the PPO rows run in
one); `recording` sets it and installs Triton's post-compile hook, chained to any hook already set.

    python -m fusedrl.bench.triton_compiles hits RECORD.jsonl MANIFEST.json
    python -m fusedrl.bench.triton_compiles fusedrl demo seed=0   # a command's compiles too

The second runs a `fusedrl` command in this process under `record_from_env` (bench/gpu.sh's demo
stage): a command outside the bench records its compiles only so, since the engine knows nothing
of bench/.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

RECORD_ENV = "FUSEDRL_TRITON_COMPILES"


def _hook(path: str, chained):
    """Triton's jit_post_compile_hook: appends the compiled kernel's line to `path`."""
    from triton._C.libtriton import get_cache_invalidating_env_vars

    def hook(*, key, fn, compile, **kwargs):
        name = f"{fn.jit_function.fn.__module__}:{fn.jit_function.fn.__qualname__}"
        try:
            kernel = fn.jit_function.device_caches[compile["device"]][0].get(key)
            line = {"kernel": name, "hash": kernel.hash,
                    "specialization": compile["specialization_data"],
                    # a key ingredient the record cannot restore: prebuilds must run under the same
                    "invalidating_env": get_cache_invalidating_env_vars()}
        except Exception as error:  # a Triton whose hook passes other things: noted, never raised
            line = {"kernel": name, "error": f"{type(error).__name__}: {error}"}
        # One write of one line in append mode: processes sharing the file do not interleave.
        with open(path, "a") as f:
            f.write(json.dumps(line) + "\n")
        return chained(key=key, fn=fn, compile=compile, **kwargs) if chained else None
    return hook


@contextlib.contextmanager
def recording(path: str):
    """Within the block, every Triton compile of this process and of the processes it starts is
    recorded in `path` (JSON lines); nothing is recorded where Triton is not installed."""
    try:
        from triton import knobs
    except ImportError:
        yield
        return
    before_env, before_hook = os.environ.get(RECORD_ENV), knobs.runtime.jit_post_compile_hook
    os.environ[RECORD_ENV] = path
    knobs.runtime.jit_post_compile_hook = _hook(path, before_hook)
    try:
        yield
    finally:
        knobs.runtime.jit_post_compile_hook = before_hook
        if before_env is None:
            os.environ.pop(RECORD_ENV, None)
        else:
            os.environ[RECORD_ENV] = before_env


def record_from_env() -> contextlib.AbstractContextManager:
    """`recording` into the file FUSEDRL_TRITON_COMPILES names (a child process of a recording
    run), else nothing."""
    path = os.environ.get(RECORD_ENV)
    return recording(path) if path else contextlib.nullcontext()


def hits(record_path: str, manifest_path: str) -> dict:
    """What a visit's record says of the prebuilt cache it carried: distinct kernels the visit
    compiled or loaded, how many of them the prebuilt cache held (Triton found them there instead
    of compiling), the names of the others, and those whose hash the hook could not read."""
    with open(manifest_path) as f:
        prebuilt = {entry["hash"] for entry in json.load(f)["kernels"]}
    used: dict[str, str] = {}
    unrecorded = set()
    with open(record_path) as f:
        for text in f:
            line = json.loads(text)
            if "hash" in line:
                used[line["hash"]] = line["kernel"]
            else:
                unrecorded.add(line["kernel"])
    missed = sorted({name for h, name in used.items() if h not in prebuilt})
    return {"kernels_used": len(used), "prebuilt": len(prebuilt),
            "hits": sum(h in prebuilt for h in used), "missed_kernels": missed,
            "unrecorded_kernels": sorted(unrecorded)}


USAGE = ("usage: python -m fusedrl.bench.triton_compiles hits RECORD.jsonl MANIFEST.json\n"
         "       python -m fusedrl.bench.triton_compiles fusedrl COMMAND [ARGS...]")


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "hits":
        print(json.dumps(hits(argv[1], argv[2]), indent=1))
        return 0
    if len(argv) >= 2 and argv[0] == "fusedrl":
        from fusedrl.engine.cli import commands, process
        process.set_cpu_defaults()  # as the `fusedrl` command sets them, before torch is imported
        with record_from_env():
            return commands.main(argv[1:])
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

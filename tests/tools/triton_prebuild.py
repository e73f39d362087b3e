"""Prebuild the Triton cache a GPU visit carries: the kernels the visit will compile, compiled here
for the GPU's architecture under the cache key the GPU image's Triton computes, so that its first
call loads them from TRITON_CACHE_DIR instead of compiling (on a fresh H100, 2026-11-27: the first
row at 45.9 s with an empty cache, 19.1 s with the previous call's).

The kernels: every compile a GPU visit recorded (bench/triton_compiles.py writes
bench/results/*/call*/triton_compiles.jsonl: Triton's own specializations, exact) and the static
check's representative workload (gpucheck.workload, recorded here in the interpreter: every public
op at the headline shapes, specialized by Triton's binder as on the GPU). A kernel whose source
changed since its record is compiled from the record under its new source: the entry the GPU asks
for when it launches the same specialization again. A record from before a kernel took INTERPRETED
is that launch with it False (gpucheck.compile.with_current_arguments); one naming a kernel that no
longer exists or takes other arguments is counted as stale and skipped.

The key (gpucheck/target_key.py): the GPU image runs Python 3.12, whose libtriton.so Triton hashes
into every key; this process uses that wheel's digest. It must run under the GPU image's Triton
release (the CI's .ci-triton36) and without the environment variables that enter the key.

    PYTHONPATH=.ci-triton36 python tests/tools/triton_prebuild.py --out DIR [--python 3.12]
        [--arch 90] [--records FILE ...] [--no-workload] [--quick]

Writes DIR/cache (a TRITON_CACHE_DIR) and DIR/manifest.json (triton, python, arch, and per kernel
its name, hash and source); exits 1 when nothing compiled.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _compiling_process(cache: str, key: str) -> None:
    # Real JITFunctions (the suite runs under the interpreter), this cache, the GPU's key.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache
    import triton.runtime.cache
    triton.runtime.cache.triton_key = lambda: key


def _compile(job) -> dict:
    source, payload, arch = job
    from gpucheck.compile import compile_launch, compile_specialization
    try:
        kernel = (compile_launch(payload, arch)[0] if source == "workload"
                  else compile_specialization(payload["specialization"], arch))
    except Exception as error:  # a stale record: the kernel is gone or takes other arguments
        return {"kernel": payload["kernel"], "source": source,
                "error": f"{type(error).__name__}: {str(error)[:200]}"}
    return {"kernel": payload["kernel"], "hash": kernel.hash, "source": source}


def visit_records(paths: list[Path]) -> list[dict]:
    """The distinct compiles (by specialization) the record files hold; SystemExit naming a file
    recorded under environment variables that enter the key."""
    seen: dict[str, dict] = {}
    for path in paths:
        for number, text in enumerate(path.read_text().splitlines(), 1):
            line = json.loads(text)
            if "specialization" not in line:  # the hook could not read this compile
                continue
            if line.get("invalidating_env"):
                raise SystemExit(f"{path}:{number}: recorded under {line['invalidating_env']}, "
                                 f"which enter Triton's key: this prebuild cannot match it")
            seen.setdefault(line["specialization"], line)
    return list(seen.values())


def prebuild(out: Path, python: str, arch: int, records: list[Path], workload: bool,
             quick: bool) -> dict:
    """Compile the kernels into out/cache; the manifest (also written to out/manifest.json)."""
    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from gpucheck.target_key import target_triton_key
    if env := get_cache_invalidating_env_vars():
        raise SystemExit(f"triton_prebuild: {env} enter Triton's key; unset them (the GPU sets none)")
    key = target_triton_key(python)
    jobs = [("visit", line, arch) for line in visit_records(records)]
    if workload:
        from gpucheck.record import record_workload
        jobs += [("workload", record, arch) for record in record_workload(quick)]
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, 8)), mp_context=get_context("spawn"),
                             initializer=_compiling_process, initargs=(str(cache), key)) as pool:
        rows = list(pool.map(_compile, jobs))
    kernels = {row["hash"]: row for row in rows if "hash" in row}
    manifest = {"triton": triton.__version__, "python": python, "arch": f"sm_{arch}",
                "compile_s": round(time.perf_counter() - start, 1),
                "kernels": sorted(kernels.values(), key=lambda r: (r["kernel"], r["hash"])),
                "stale": [row for row in rows if "error" in row]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--python", default="3.12", help="the GPU image's Python (major.minor)")
    parser.add_argument("--arch", type=int, default=90, help="the GPU's compute capability")
    parser.add_argument("--records", type=Path, nargs="*", default=[],
                        help="triton_compiles.jsonl files of GPU visits")
    parser.add_argument("--no-workload", action="store_true", help="only the visits' records")
    parser.add_argument("--quick", action="store_true", help="the workload's quick form")
    args = parser.parse_args(argv)
    manifest = prebuild(args.out, args.python, args.arch, args.records, not args.no_workload,
                        args.quick)
    sources = {}
    for row in manifest["kernels"]:
        sources[row["source"]] = sources.get(row["source"], 0) + 1
    print(f"triton_prebuild: {len(manifest['kernels'])} kernels for {manifest['arch']} under "
          f"Python {args.python}'s key (triton {manifest['triton']}; {sources}), "
          f"{len(manifest['stale'])} stale records skipped, {manifest['compile_s']} s",
          file=sys.stderr)
    return 0 if manifest["kernels"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The Triton cache key of another Python's build of this Triton release: what the GPU image's
Triton (same release, Python 3.12) computes for a kernel compiled here.

Triton hashes its own files into every cache key (`triton.runtime.cache.triton_key`): its Python
sources and libtriton.so's bytes. The wheels of one release carry the same Python sources but a
libtriton.so built per Python ABI, so a cache compiled here under this interpreter's key is never
hit by a 3.12 process. The compiler's output does not depend on the ABI: the target's key is this
key with libtriton.so's digest replaced by the target wheel's, once the sources are checked equal.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

LIBTRITON = "triton/_C/libtriton.so"


def translated_key(local_key: str, local_digest: str, target_digest: str) -> str:
    """local_key with libtriton.so's digest local_digest replaced by target_digest; ValueError if
    the key does not hold local_digest exactly once (Triton's key format changed)."""
    if local_key.count(local_digest) != 1:
        raise ValueError(f"triton_key holds libtriton.so's digest {local_digest[:12]}... "
                         f"{local_key.count(local_digest)} times, expected once")
    return local_key.replace(local_digest, target_digest)


def wheel_digest(wheel: Path, installed: Path) -> str:
    """sha256 of the wheel's libtriton.so; ValueError naming the first Python source of the wheel
    that differs from the installed Triton at `installed` (its package folder)."""
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("triton/") and name.endswith(".py"):
                local = installed.parent / name
                if not local.is_file() or local.read_bytes() != archive.read(name):
                    raise ValueError(f"{wheel.name}: {name} differs from the installed triton's "
                                     f"({installed}): not the same release")
        return hashlib.sha256(archive.read(LIBTRITON)).hexdigest()


def download_wheel(version: str, python: str, folder: Path) -> Path:
    """pip's download (no install) of triton==version for CPython `python` ("3.12") on x86-64
    Linux into folder."""
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", python,
                    "--platform", "manylinux_2_27_x86_64", "--platform", "manylinux_2_28_x86_64",
                    "-d", str(folder), f"triton=={version}"], check=True)
    tag = "cp" + python.replace(".", "")
    found = sorted(folder.glob(f"triton-{version}-{tag}-*.whl"))
    if not found:
        raise FileNotFoundError(f"pip downloaded no triton {version} wheel for Python {python}")
    return found[0]


def target_triton_key(python: str) -> str:
    """The triton_key a Python `python` process with this Triton release computes (this process's
    own key when `python` is this interpreter's version)."""
    import triton
    from triton.runtime.cache import triton_key
    key = triton_key()
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        return key
    installed = Path(triton.__file__).resolve().parent
    local = hashlib.sha256((installed / "_C" / "libtriton.so").read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as folder:
        wheel = download_wheel(triton.__version__, python, Path(folder))
        return translated_key(key, local, wheel_digest(wheel, installed))

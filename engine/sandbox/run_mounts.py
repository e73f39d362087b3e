"""A bubblewrap run's writable mounts, capped in size and in inodes, made before bubblewrap starts.

bubblewrap's `--tmpfs` caps a tmpfs's size, not its inodes: the kernel's default (half the host's
pages) let one run hold hundreds of MiB of kernel memory in empty files. So the child that
becomes bubblewrap (after fork, before exec: only system calls) enters a private mount namespace
of its own (a root caller: a new mount namespace; a plain user: a new user namespace mapping its
own uid and gid, and a mount namespace in it), mounts a small holder tmpfs at the first of
HOLDERS there (hidden in that namespace alone: the host's mounts are untouched), and in it one
tmpfs per entry of MOUNTS with `size=` and `nr_inodes=`, owned by the run's uid, which bubblewrap
binds into the box (`bind_words`). A root caller's interpreter under a directory only root may
enter (/root/.pyenv) is shown at `view()` in the holder. Everything lives as long as the
namespace: it goes with the run's last process.
"""
from __future__ import annotations

import ctypes
import os

# name in the holder: (where bubblewrap binds it, MiB, inodes)
MOUNTS = {"tmp": ("/tmp", 64, 4096), "sandbox": ("/sandbox", 64, 4096),
          "shm": ("/dev/shm", 16, 1024)}  # /dev/shm: POSIX shared memory, multiprocessing's locks
# Where the holder may go: a directory nothing bubblewrap or the interpreter needs lives under
# (/tmp last: a bubblewrap or interpreter there would be hidden).
HOLDERS = ("/dev/shm", "/run", "/mnt", "/tmp")
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_NOSUID, _MS_NODEV, _MS_BIND, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x1000, 0x4000, 0x40000


def holder() -> str:
    """The first HOLDERS directory here (in the caller: the child makes no choice)."""
    found = [path for path in HOLDERS if os.path.isdir(path) and not os.path.islink(path)]
    if not found:
        raise RuntimeError(f"run_mounts: none of {HOLDERS} is a directory here")
    return found[0]


def view(at: str) -> str:
    """Where a root caller's interpreter prefix is shown, under the holder `at`."""
    return os.path.join(at, "python")


def bind_words(at: str) -> list[str]:
    """bubblewrap's arguments binding each of MOUNTS (made under the holder `at`) in place."""
    words: list[str] = []
    for name, (inside, _mb, _inodes) in MOUNTS.items():
        words += ["--bind", os.path.join(at, name), inside]
    return words


def enter(at: str, uid: "int | None", prefix: str) -> None:
    """In the child, before exec: a private mount namespace with MOUNTS under the holder `at`,
    owned by `uid` (a root caller's fresh uid; None: the caller's own), and `prefix` shown at
    view(at) when not empty. Raises OSError when a step fails (the run then fails)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if uid is None:
        _own_user_namespace(libc)
    else:
        _checked(libc.unshare(_CLONE_NEWNS), "a mount namespace")
    _checked(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "private mounts")
    _checked(libc.mount(b"tmpfs", at.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                        b"size=64k,nr_inodes=16,mode=755"), f"the holder at {at}")
    owner = "" if uid is None else f",uid={uid},gid={uid}"
    for name, (_inside, size_mb, inodes) in MOUNTS.items():
        path = os.path.join(at, name)
        os.mkdir(path, 0o700)
        options = f"size={size_mb}m,nr_inodes={inodes},mode=700{owner}"
        _checked(libc.mount(b"tmpfs", path.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                            options.encode()), f"{path} ({options})")
    if prefix:
        os.mkdir(view(at), 0o755)
        _checked(libc.mount(prefix.encode(), view(at).encode(), None, _MS_BIND | _MS_REC, None),
                 f"showing {prefix}")


def _own_user_namespace(libc) -> None:
    """A new user namespace mapping this process's uid and gid to themselves (a plain user may
    mount there; after exec, with a uid other than 0, bubblewrap holds no capability in it)."""
    uid, gid = os.getuid(), os.getgid()
    _checked(libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS), "a user and mount namespace")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as out:
            out.write(text)


def _checked(result: int, step: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"run_mounts: {step}: {os.strerror(code)}")

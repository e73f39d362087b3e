"""A root trainer's sandbox runs as a fresh unprivileged uid, never as root.

bubblewrap run by root maps the code's uid to host uid 0: without a single capability, the code
still owns every root-owned file it can see, /proc/sys and /proc/sysrq-trigger included (a write
there reaches the host's kernel). So, in the child that becomes bubblewrap (after fork, before
exec: only system calls), a root caller gives up root: it takes a new uid of its own from
FRESH_UIDS (no process or file of the host has it; RLIMIT_NPROC then counts this run alone), and
bubblewrap runs unprivileged, through user namespaces. An interpreter under a directory only root
may enter (/root/.pyenv) is first shown to it at VIEW, in a private mount namespace of that child
alone (a tmpfs over /tmp there: the host's mounts are untouched).
"""
from __future__ import annotations

import ctypes
import os
import secrets

FRESH_UIDS = (1 << 30, 1 << 31)  # far above any system's users and subordinate ranges
VIEW = "/tmp/fusedrl-python"
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 0x40000


def needed() -> bool:
    """Whether this process is root (its sandboxes must give it up)."""
    return os.geteuid() == 0


def new_uid() -> int:
    """A uid no other run holds (drawn at random from FRESH_UIDS)."""
    return FRESH_UIDS[0] + secrets.randbelow(FRESH_UIDS[1] - FRESH_UIDS[0])


def enter(uid: int, prefix: str) -> None:
    """In the child, before exec: show `prefix` at VIEW (when not empty), then become `uid`
    (gid too, no supplementary groups). Raises OSError when a step fails (the run then fails:
    it never continues as root)."""
    if prefix:
        libc = ctypes.CDLL(None, use_errno=True)
        steps = [lambda: libc.unshare(_CLONE_NEWNS),
                 lambda: libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None),
                 lambda: libc.mount(b"tmpfs", b"/tmp", b"tmpfs", 0, b"size=64k,mode=755")]
        for step in steps:
            if step() != 0:
                raise OSError(ctypes.get_errno(), "fresh_user: private mount namespace")
        os.mkdir(VIEW, 0o755)
        if libc.mount(prefix.encode(), VIEW.encode(), None, _MS_BIND | _MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), f"fresh_user: showing {prefix}")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)

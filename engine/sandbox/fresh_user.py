"""A root trainer's sandbox runs as a fresh unprivileged uid, never as root.

bubblewrap run by root maps the code's uid to host uid 0: without a single capability, the code
still owns every root-owned file it can see, /proc/sys and /proc/sysrq-trigger included (a write
there reaches the host's kernel). So, in the child that becomes bubblewrap (after fork, before
exec: only system calls, after run_mounts.py's mounts), a root caller gives up root: it takes a
new uid of its own from FRESH_UIDS (no process or file of the host has it; RLIMIT_NPROC then
counts this run alone), and bubblewrap runs unprivileged, through user namespaces.
"""
from __future__ import annotations

import os
import secrets

FRESH_UIDS = (1 << 30, 1 << 31)  # far above any system's users and subordinate ranges


def needed() -> bool:
    """Whether this process is root (its sandboxes must give it up)."""
    return os.geteuid() == 0


def new_uid() -> int:
    """A uid no other run holds (drawn at random from FRESH_UIDS)."""
    return FRESH_UIDS[0] + secrets.randbelow(FRESH_UIDS[1] - FRESH_UIDS[0])


def become(uid: int) -> None:
    """In the child, before exec: become `uid` (gid too, no supplementary groups). Raises OSError
    when a step fails (the run then fails: it never continues as root)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)

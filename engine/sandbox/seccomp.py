"""The seccomp filter of a bubblewrap sandbox: the kernel's attack surface the model's code never
needs, denied with EPERM (bwrap `--seccomp FD` loads it, with no_new_privs, before the code runs).

`program()` -> the filter as bytes (an array of classic-BPF `struct sock_filter`), or None on an
architecture without a table here. Denied: namespaces (`unshare`, `setns`, `clone` with a CLONE_NEW*
flag; `clone3` answers ENOSYS so the C library falls back to `clone`, whose flags are checked),
mounts, `ptrace` and `process_vm_*`, `bpf`, the keyring, `io_uring_*`, `userfaultfd`,
`perf_event_open`, kernel modules and kexec, `open_by_handle_at`, memory outside every size cap
(`memfd_create`, `memfd_secret`), kernel objects no cap counts (System V shared memory,
semaphores and message queues, POSIX message queues, AIO contexts, inotify and fanotify), and
every socket family but AF_UNIX, AF_INET and AF_INET6 (`socket` and `socketpair`: netlink, packet,
vsock, whose port space a network namespace does not separate, and the rest). Another
architecture's calling convention (x32, i386 on x86_64) kills the process.
"""
from __future__ import annotations

import errno
import platform
import struct
from typing import Optional

_DENIED = {  # name: (x86_64 number, aarch64 number or None)
    "unshare": (272, 97), "setns": (308, 268), "mount": (165, 40), "umount2": (166, 39),
    "pivot_root": (155, 41), "chroot": (161, 51), "ptrace": (101, 117),
    "process_vm_readv": (310, 270), "process_vm_writev": (311, 271), "bpf": (321, 280),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    "userfaultfd": (323, 282), "perf_event_open": (298, 241), "kexec_load": (246, 104),
    "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "open_by_handle_at": (304, 265), "open_tree": (428, 428),
    "move_mount": (429, 429), "fsopen": (430, 430), "fsconfig": (431, 431),
    "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "memfd_create": (319, 279), "memfd_secret": (447, 447),
    # Kernel objects no cap counts: System V IPC (a run's semaphore arrays held GiBs of kernel
    # memory), POSIX message queues, AIO contexts (fs.aio-max-nr is host-wide), inotify and
    # fanotify groups (counted per uid: a plain-user trainer's own).
    "shmget": (29, 194), "shmat": (30, 196), "shmctl": (31, 195), "shmdt": (67, 197),
    "semget": (64, 190), "semop": (65, 193), "semctl": (66, 191), "semtimedop": (220, 192),
    "msgget": (68, 186), "msgsnd": (69, 189), "msgrcv": (70, 188), "msgctl": (71, 187),
    "mq_open": (240, 180), "io_setup": (206, 0), "io_submit": (209, 2),
    "inotify_init": (253, None), "inotify_init1": (294, 26), "fanotify_init": (300, 262),
}
_CLONE, _CLONE3, _SOCKET, _SOCKETPAIR = (56, 220), (435, 435), (41, 198), (53, 199)
_ARCHES = {"x86_64": (0, 0xC000003E), "amd64": (0, 0xC000003E), "aarch64": (1, 0xC00000B7),
           "arm64": (1, 0xC00000B7)}
_X32_BIT = 0x40000000
# CLONE_NEWTIME | NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_NEW_NAMESPACE = 0x00000080 | 0x00020000 | 0x7E000000
_AF_UNIX, _AF_INET, _AF_INET6 = 1, 2, 10  # the only socket families allowed

_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL_PROCESS = 0x7FFF0000, 0x80000000
_ERRNO = 0x00050000
_NR, _ARCH, _ARG0 = 0, 4, 16  # offsets in struct seccomp_data (arg 0's low word: little-endian)


def program(machine: Optional[str] = None) -> Optional[bytes]:
    """The filter for `machine` (default: this one's), or None where no syscall table is known."""
    arch = _ARCHES.get((machine or platform.machine()).lower())
    if arch is None:
        return None
    column, audit_arch = arch
    code: list = [(_LD_W_ABS, _ARCH), (_JEQ, "nr", "kill", audit_arch),
                  ("kill", _RET, _KILL_PROCESS), ("nr", _LD_W_ABS, _NR),
                  (_JGE, "deny", None, _X32_BIT)]
    code += [(_JEQ, "deny", None, numbers[column]) for numbers in _DENIED.values()
             if numbers[column] is not None]  # None: not a syscall of that architecture
    code += [(_JEQ, "clone", None, _CLONE[column]), (_JEQ, "enosys", None, _CLONE3[column]),
             (_JEQ, "socket", None, _SOCKET[column]), (_JEQ, "socket", None, _SOCKETPAIR[column]),
             (_RET, _ALLOW),
             ("clone", _LD_W_ABS, _ARG0), (_JSET, "deny", "allow", _NEW_NAMESPACE),
             # the family is an int: its low word is all of it
             ("socket", _LD_W_ABS, _ARG0), (_JEQ, "allow", None, _AF_UNIX),
             (_JEQ, "allow", None, _AF_INET), (_JEQ, "allow", "deny", _AF_INET6),
             ("allow", _RET, _ALLOW), ("enosys", _RET, _ERRNO | errno.ENOSYS),
             ("deny", _RET, _ERRNO | errno.EPERM)]
    return _assemble(code)


def _assemble(code: list) -> bytes:
    """Instructions (an optional label first; jumps name labels, None = the next one) -> bytes."""
    labels, plain = {}, []
    for at, line in enumerate(code):
        if isinstance(line[0], str):
            labels[line[0]] = at
            line = line[1:]
        plain.append(line)
    out = bytearray()
    for at, line in enumerate(plain):
        if line[0] in (_JEQ, _JGE, _JSET):
            op, true, false, k = line
            jt, jf = (0 if to is None else labels[to] - at - 1 for to in (true, false))
            out += struct.pack("=HBBI", op, jt, jf, k)
        else:
            out += struct.pack("=HBBI", line[0], 0, 0, line[1])
    return bytes(out)

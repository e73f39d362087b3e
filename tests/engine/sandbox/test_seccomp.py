"""The seccomp filter's program: one per known architecture, every jump inside it, none where no
syscall table is known (bubblewrap is then not a strong sandbox), and its own answers (read from
its instructions) for the socket families, memory, namespace and other-architecture rules. What
it denies is also tested by calling each syscall in the sandbox (test_sandbox_attacks.py)."""
import errno
import struct

import pytest

from fusedrl.engine.sandbox import seccomp


def test_each_known_architecture_gets_a_program_whose_jumps_stay_inside_it():
    for machine in ("x86_64", "aarch64"):
        program = seccomp.program(machine)
        assert program and len(program) % 8 == 0
        instructions = list(struct.iter_unpack("=HBBI", program))
        for at, (code, true, false, _k) in enumerate(instructions):
            if code & 0x07 == 0x05:  # a jump: both targets are later instructions
                assert at + 1 + max(true, false) < len(instructions)
        assert instructions[-1][0] == 0x06  # it ends in a return
    assert seccomp.program("x86_64") != seccomp.program("aarch64")


def test_an_unknown_architecture_gets_none():
    assert seccomp.program("sparc64") is None


def run_filter(program: bytes, nr: int, arg0: int, arch: int) -> int:
    """What the classic-BPF `program` returns for a call `nr(arg0)` of `arch` (a reading of the
    instructions it uses: load a word of struct seccomp_data, jeq, jge, jset, ret)."""
    data = {0: nr, 4: arch, 16: arg0 & 0xFFFFFFFF}
    instructions = list(struct.iter_unpack("=HBBI", program))
    at, accumulator = 0, 0
    while True:
        code, true, false, k = instructions[at]
        if code == 0x06:
            return k
        if code == 0x20:
            accumulator, at = data[k], at + 1
            continue
        taken = {0x15: accumulator == k, 0x35: accumulator >= k, 0x45: accumulator & k}[code]
        at += 1 + (true if taken else false)


# machine: (AUDIT_ARCH, socket, socketpair, memfd_create, shmget, unshare, clone, clone3)
NUMBERS = {"x86_64": (0xC000003E, 41, 53, 319, 29, 272, 56, 435),
           "aarch64": (0xC00000B7, 198, 199, 279, 194, 97, 220, 435)}


@pytest.mark.parametrize("machine", list(NUMBERS))
def test_socket_families_memory_and_namespaces_by_the_filters_own_rules(machine):
    """The filter's answer itself (EPERM), whatever this kernel would answer without it."""
    program = seccomp.program(machine)
    arch, socket, socketpair, memfd, shmget, unshare, clone, clone3 = NUMBERS[machine]
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    for call in (socket, socketpair):
        for family in (1, 2, 10):  # AF_UNIX, AF_INET, AF_INET6
            assert run_filter(program, call, family, arch) == allow
        for family in (40, 16, 17, 38, 44, 0, 3, 11, 1 << 32 | 40, 255):  # vsock, netlink ...
            assert run_filter(program, call, family, arch) == eperm, (call, family)
    for call in (memfd, 447, shmget, unshare):  # memfd_secret: 447 on both
        assert run_filter(program, call, 0, arch) == eperm
    assert run_filter(program, clone, 0x10000000, arch) == eperm  # CLONE_NEWUSER
    assert run_filter(program, clone, 0x11, arch) == allow  # SIGCHLD | a plain fork's flags
    assert run_filter(program, clone3, 0, arch) == enosys
    assert run_filter(program, 63, 0, arch) == allow  # read on aarch64, uname on x86_64
    assert run_filter(program, socket, 1, arch=0x40000003) == 0x80000000  # i386: killed
    if machine == "x86_64":
        assert run_filter(program, 0x40000000 | socket, 1, arch) == eperm  # x32


# machine: the kernel objects no cap counts: System V IPC (shm, sem, msg), mq_open, io_setup,
# io_submit, inotify_init1, fanotify_init (and x86_64's inotify_init)
KERNEL_OBJECTS = {"x86_64": (29, 30, 31, 67, 64, 65, 66, 220, 68, 69, 70, 71, 240, 206, 209, 294,
                             300, 253),
                  "aarch64": (194, 196, 195, 197, 190, 193, 191, 192, 186, 189, 188, 187, 180, 0,
                              2, 26, 262)}


@pytest.mark.parametrize("machine", list(KERNEL_OBJECTS))
def test_kernel_objects_no_cap_counts_are_denied_by_the_filters_own_rules(machine):
    program, arch = seccomp.program(machine), NUMBERS[machine][0]
    for call in KERNEL_OBJECTS[machine]:
        assert run_filter(program, call, 0, arch) == 0x00050000 | errno.EPERM, call
    for call in (1, 3) if machine == "x86_64" else (64, 57):  # write, close
        assert run_filter(program, call, 0, arch) == 0x7FFF0000

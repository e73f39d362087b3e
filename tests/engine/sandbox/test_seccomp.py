"""The seccomp filter's program: one per known architecture, every jump inside it, and none where
no syscall table is known (bubblewrap is then not a strong sandbox). What it denies is tested by
calling each syscall in the sandbox (test_sandbox_attacks.py)."""
import struct

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

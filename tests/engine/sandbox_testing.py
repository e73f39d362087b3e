"""Attack programs for the sandbox tests, each a function of the trainer's facts that returns the
source of a program printing one JSON list: what it managed (empty when the sandbox held).
Standard library only: tests/engine/sandbox/test_sandbox_as_plain_user.py runs them under a
plain user's interpreter too."""
import json
import os
import subprocess
import sys
import time

PLAIN = 65534  # the plain user the tests become (setpriv)

# Each syscall the seccomp filter must deny, with arguments that would otherwise succeed or fail
# differently (x86_64 numbers; the test skips elsewhere).
KERNEL_SURFACE = {"unshare": (272, (0x10000000,)), "setns": (308, (0, 0)),
                  "mount": (165, (0, 0, 0, 0, 0)), "ptrace": (101, (16, 1, 0, 0)),
                  "bpf": (321, (0, 0, 0)), "keyctl": (250, (0, 0)),
                  "io_uring_setup": (425, (1, 0)), "userfaultfd": (323, (0,)),
                  "perf_event_open": (298, (0, 0, -1, -1, 0))}
# Socket families the seccomp filter denies (socket and socketpair), each with a type the family
# takes: vsock first (a network namespace does not separate its port space).
DENIED_FAMILIES = {"AF_VSOCK": (40, 1), "AF_NETLINK": (16, 3), "AF_PACKET": (17, 3),
                   "AF_ALG": (38, 5), "AF_KEY": (15, 3), "AF_TIPC": (30, 4), "AF_XDP": (44, 3),
                   "AF_CAN": (29, 3), "AF_RDS": (21, 5), "AF_APPLETALK": (5, 2),
                   "AF_BLUETOOTH": (31, 1), "AF_PPPOX": (24, 1)}


def read_files(paths: list) -> str:
    """Reads each path; reports those it could read."""
    return _each_path(paths, "open(path, 'rb').read(1)")


def write_files(paths: list) -> str:
    """Writes each path (creating or appending); reports those it could write."""
    return _each_path(paths, "open(path, 'a').write('owned')")


def open_for_writing(paths: list) -> str:
    """Opens each path write-only, writing nothing; reports those it could open."""
    return _each_path(paths, "os.close(os.open(path, os.O_WRONLY))")


def _each_path(paths: list, statement: str) -> str:
    """A program running `statement` on each of `paths`; reports those where it did not fail."""
    return f"""
import json, os
got = []
for path in {paths!r}:
    try:
        {statement}
        got.append(path)
    except OSError:
        pass
print(json.dumps(got))
"""


def reach_network(port: int, unix_path: str, abstract: str) -> str:
    """TCP to the host's loopback, a unix socket file and an abstract one, the host's network
    namespace through setns (as pid 1's and as its parent's); reports what connected."""
    return f"""
import ctypes, json, os, socket
got = []
for family, address in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_UNIX, {unix_path!r}),
                        (socket.AF_UNIX, '\\0' + {abstract!r})]:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.connect(address)
        got.append(str(address))
    except OSError:
        pass
libc = ctypes.CDLL(None, use_errno=True)
for pid in (1, os.getppid()):
    try:
        fd = os.open(f'/proc/{{pid}}/ns/net', os.O_RDONLY)
        if libc.setns(fd, 0x40000000) == 0:
            got.append(f'setns {{pid}}')
    except OSError:
        pass
print(json.dumps(got))
"""


def trainer_memory(pid: int) -> str:
    """The trainer's memory (at an address its maps say is readable) and environment through
    /proc; reports what it read."""
    files = read_files([f"/proc/{pid}/environ", f"/proc/{pid}/cmdline",
                        f"/proc/{pid}/root/etc/passwd"])
    return f"""
import json
memory = []
try:
    with open('/proc/{pid}/maps') as maps:
        start = int(next(l for l in maps if ' r' in l).split('-')[0], 16)
    with open('/proc/{pid}/mem', 'rb') as mem:
        mem.seek(start)
        mem.read(1)
    memory.append('mem')
except (OSError, StopIteration, ValueError):
    pass
""" + files.replace("got = []", "got = memory")


def kernel_surface() -> str:
    """Calls each KERNEL_SURFACE syscall and a netlink socket; reports those not denied EPERM."""
    return f"""
import ctypes, json, socket
libc = ctypes.CDLL(None, use_errno=True)
got = []
for name, (number, args) in {KERNEL_SURFACE!r}.items():
    ctypes.set_errno(0)
    result = libc.syscall(number, *args)
    if result != -1 or ctypes.get_errno() != 1:
        got.append(f'{{name}}: {{result}} errno {{ctypes.get_errno()}}')
try:
    socket.socket(16, socket.SOCK_RAW, 12).close()  # AF_NETLINK, NETLINK_NETFILTER
    got.append('netlink')
except OSError:
    pass
print(json.dumps(got))
"""


def socket_families() -> str:
    """socket() and socketpair() in each DENIED_FAMILIES family, and in the allowed ones; reports
    each call of a denied family not refused EPERM (the filter's answer: without it the kernel
    answers EAFNOSUPPORT, EOPNOTSUPP or succeeds), and each allowed call refused EPERM."""
    return f"""
import errno, json, socket
got = []
for name, (family, kind) in {DENIED_FAMILIES!r}.items():
    for call in (socket.socket, socket.socketpair):
        try:
            call(family, kind)
            got.append(f'{{name}} {{call.__name__}}: allowed')
        except OSError as e:
            if e.errno != errno.EPERM:
                got.append(f'{{name}} {{call.__name__}}: {{errno.errorcode.get(e.errno)}}')
for family, call in [(socket.AF_UNIX, socket.socketpair), (socket.AF_UNIX, socket.socket),
                     (socket.AF_INET, socket.socket), (socket.AF_INET6, socket.socket)]:
    try:
        call(family, socket.SOCK_STREAM)
    except OSError as e:
        if e.errno == errno.EPERM:
            got.append(f'{{family!r}} {{call.__name__}} denied')
print(json.dumps(got))
"""


def other_processes() -> str:
    """For every process it sees but its own: each descriptor (/proc/PID/fd/N) opened for reading
    and for writing, its memory and its environment read; reports what it opened."""
    return """
import json, os
got = []
for pid in [p for p in os.listdir('/proc') if p.isdigit() and int(p) != os.getpid()]:
    try:
        fds = os.listdir(f'/proc/{pid}/fd')
    except OSError:
        fds = [str(n) for n in range(16)]
    for fd in fds:
        for flags in (os.O_RDONLY, os.O_WRONLY):
            try:
                os.close(os.open(f'/proc/{pid}/fd/{fd}', flags | os.O_NONBLOCK))
                got.append(f'/proc/{pid}/fd/{fd} {flags}')
            except OSError:
                pass
    for part in ('mem', 'environ'):
        try:
            with open(f'/proc/{pid}/{part}', 'rb') as f:
                f.read(1)
            got.append(f'/proc/{pid}/{part}')
        except OSError:
            pass
print(json.dumps(got))
"""


def unbounded_shared_memory() -> str:
    """Memory outside the address-space limit and every tmpfs cap: a memfd written (not
    mapped), a System V segment; reports which it got."""
    return """
import ctypes, json, os
got = []
try:
    os.write(os.memfd_create('held'), b'x' * (1 << 20))
    got.append('memfd')
except OSError:
    pass
libc = ctypes.CDLL(None, use_errno=True)
if libc.shmget(0, 1 << 20, 0o1600) >= 0:  # IPC_PRIVATE, IPC_CREAT | 0600
    got.append('shmget')
print(json.dumps(got))
"""


def fork_bomb(marker: str) -> str:
    """Forks children that sleep (holding `marker` in their command line) until a fork fails;
    reports how many it held at once."""
    return f"""
import json, os, sys
held = 0
while held < 500:
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])
    held += 1
print(json.dumps([held]), flush=True)
"""


def memory_total(children: int, each_mb: int) -> str:
    """`children` processes each touching `each_mb` and then waiting; reports how many hold it at
    once, two seconds on: a child counts if it said it holds its block and is still alive (one the
    cap's OOM kill took after it said so no longer holds anything)."""
    return f"""
import json, os, signal, time
started = []
for _ in range({children}):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray({each_mb} << 20)
            for at in range(0, len(block), 4096):
                block[at] = 1
            os.write(w, b'1')
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    started.append((pid, r))
time.sleep(2)
held = 0
for pid, r in started:
    alive = os.waitpid(pid, os.WNOHANG) == (0, 0)
    os.set_blocking(r, False)
    try:
        said = os.read(r, 1) == b'1'
    except BlockingIOError:
        said = False
    held += alive and said
    if alive:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
print(json.dumps([held]))
"""


def fill_tmp(total_mb: int) -> str:
    """Writes `total_mb` into /tmp in 8 MiB files; reports the MiB written."""
    return fill({"/tmp": total_mb})


def fill(sizes: dict) -> str:
    """Writes `sizes[directory]` MiB into each directory in 8 MiB files; reports the MiB written
    into each, in order."""
    return f"""
import json
got = []
for directory, total_mb in {sizes!r}.items():
    written = 0
    try:
        for at in range(total_mb // 8):
            with open(f'{{directory}}/fill{{at}}', 'wb') as f:
                f.write(b'x' * (8 << 20))
            written += 8
    except OSError:
        pass
    got.append(written)
print(json.dumps(got))
"""


def outlive(marker: str) -> str:
    """Starts a new-session child that sleeps (holding `marker`), then loops past its timeout."""
    return f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)', {marker!r}])
while True:
    pass
"""


WRAPPER_MARK = "fusedrl-test-bwrap-wrapper"


def bwrap_wrapper(directory: str, real: str) -> str:
    """Writes `directory`/bwrap, a script that says WRAPPER_MARK on stderr and runs the bubblewrap
    at `real`; returns its path (a run's stderr then shows which bwrap ran it)."""
    path = os.path.join(directory, "bwrap")
    with open(path, "w") as script:
        script.write(f'#!/bin/sh\necho {WRAPPER_MARK} >&2\nexec {real} "$@"\n')
    os.chmod(path, 0o755)
    return path


def reported(result) -> list:
    """The JSON list an attack printed (its last line)."""
    lines = result.stdout.strip().splitlines()
    assert lines, result
    return json.loads(lines[-1])


def left_after(marker: str, limit_s: float = 5.0) -> list:
    """holding(marker) once it is empty, or after `limit_s` (killed processes need a moment of
    CPU to end on a loaded machine)."""
    deadline = time.monotonic() + limit_s
    while (found := holding(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def holding(marker: str) -> list:
    """The running processes (zombies aside) with `marker` in their command line."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def plain_python():
    """An interpreter uid PLAIN can run (the system's, else the suite's), or None."""
    for python in ("/usr/bin/python3", os.path.realpath(sys.executable)):
        if os.path.exists(python) and subprocess.run(
                ["setpriv", f"--reuid={PLAIN}", f"--regid={PLAIN}", "--clear-groups", python,
                 "-c", "import sys; assert sys.version_info >= (3, 9)"],
                capture_output=True).returncode == 0:
            return python
    return None


def as_plain_user(python: str) -> list:
    """The command prefix running `python` as uid PLAIN."""
    return ["setpriv", f"--reuid={PLAIN}", f"--regid={PLAIN}", "--clear-groups", python]

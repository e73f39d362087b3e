"""Attack programs on the kernel's objects and counts that no size cap of a run counts (System V
IPC, POSIX message queues, AIO contexts, inotify and fanotify groups, ptys, vsock ports, tmpfs
inodes), each the source of a program printing one JSON list, as sandbox_testing.py's. Standard
library only: the plain-user probe runs them under the system's interpreter too."""

# What kernel_objects() reports for each kind of object it made.
KERNEL_OBJECTS = ("semget", "msgget", "shmget", "mq_open", "io_setup", "inotify", "fanotify",
                  "pty", "vsock")


def kernel_objects() -> str:
    """One of each kernel object no size cap counts (a System V semaphore array, message queue
    and shared memory segment, a POSIX message queue, an AIO context, inotify and fanotify
    groups, a pty, a bound AF_VSOCK port), each removed at once (a weak mode's would outlive the
    run: no IPC namespace); reports the KERNEL_OBJECTS names of those it made."""
    return """
import ctypes, json, os, platform, socket
libc = ctypes.CDLL(None, use_errno=True)
got = []
system_v = [('semget', lambda: libc.semget(0, 1, 0o1600), lambda i: libc.semctl(i, 0, 0)),
            ('msgget', lambda: libc.msgget(0, 0o1600), lambda i: libc.msgctl(i, 0, None)),
            ('shmget', lambda: libc.shmget(0, 4096, 0o1600), lambda i: libc.shmctl(i, 0, None))]
for name, make, remove in system_v:  # IPC_PRIVATE, IPC_CREAT | 0600; removed with IPC_RMID
    made = make()
    if made >= 0:
        got.append(name)
        remove(made)
queue = f'/fusedrl-attack-{os.getpid()}'.encode()
if libc.mq_open(queue, os.O_CREAT | os.O_RDWR, 0o600, None) >= 0:
    got.append('mq_open')
    libc.mq_unlink(queue)
setup, destroy = {'x86_64': (206, 207), 'aarch64': (0, 1)}[platform.machine()]
context = ctypes.c_ulong(0)
if libc.syscall(setup, 1, ctypes.byref(context)) == 0:
    got.append('io_setup')
    libc.syscall(destroy, context)
# fanotify with FAN_REPORT_FID needs no capability
for name, fd in [('inotify', libc.inotify_init1(0)), ('fanotify', libc.fanotify_init(0x200, 0))]:
    if fd >= 0:
        got.append(name)
        os.close(fd)
try:
    for fd in os.openpty():
        os.close(fd)
    got.append('pty')
except OSError:
    pass
try:
    with socket.socket(40, socket.SOCK_STREAM) as vsock:  # AF_VSOCK
        vsock.bind((0xFFFFFFFF, 0xFFFFFFFF))  # any cid, any port
    got.append('vsock')
except OSError:
    pass
print(json.dumps(got))
"""


def fill_inodes(directories: list, limit: int) -> str:
    """Makes up to `limit` empty files in each directory (inodes only, no block); reports how
    many it made in each, in order."""
    return f"""
import json, os
got = []
for directory in {directories!r}:
    made = 0
    try:
        while made < {limit}:
            os.close(os.open(f'{{directory}}/i{{made}}', os.O_CREAT | os.O_WRONLY, 0o600))
            made += 1
    except OSError:
        pass
    got.append(made)
print(json.dumps(got))
"""


def hold_everything(sizes: dict, inodes: int, arrays: int) -> str:
    """Everything a run may hold outside its processes' address space, at once: `sizes[directory]`
    MiB written into each directory (8 MiB files, from a 1 MiB buffer: its own memory stays
    small), then up to `inodes` empty files in each, then up to `arrays` System V semaphore arrays
    of 32,000 semaphores (2 MiB of kernel memory each where allowed); removes the arrays, and
    reports [MiB written per directory, files made per directory, arrays made]."""
    return f"""
import ctypes, json, os
chunk, written, made = b'x' * (1 << 20), [], []
for directory, total_mb in {sizes!r}.items():
    done = 0
    try:
        while done < total_mb:
            with open(f'{{directory}}/data{{done // 8}}', 'ab') as out:
                out.write(chunk)
            done += 1
    except OSError:
        pass
    written.append(done)
for directory in {sizes!r}:
    count = 0
    try:
        while count < {inodes}:
            os.close(os.open(f'{{directory}}/i{{count}}', os.O_CREAT | os.O_WRONLY, 0o600))
            count += 1
    except OSError:
        pass
    made.append(count)
libc = ctypes.CDLL(None, use_errno=True)
ids = []
while len(ids) < {arrays} and (array := libc.semget(0, 32000, 0o1600)) >= 0:
    ids.append(array)
for array in ids:
    libc.semctl(array, 0, 0)  # IPC_RMID
print(json.dumps([written, made, len(ids)]))
"""

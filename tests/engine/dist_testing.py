"""Running a stage under `torchrun` from a test: 2 CPU processes over gloo, through the real command,
or several stage runs in one launch (`torchrun_runs`: the ranks start once)."""
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from fusedrl.engine.config import io as config_io


RANK_THREADS = 1


@contextmanager
def rank_threads():
    """Run the enclosed one-process reference on as many intra-op threads as each torchrun rank has.
    A CPU matmul splits its reduction by thread count, so on a many-core machine (16 threads by
    default on the GPU hosts) the one process rounds differently from the 1-thread ranks: a bf16
    weight then flips by one unit in the last place (3e-3 relative) without any data-parallel error."""
    threads = torch.get_num_threads()
    torch.set_num_threads(RANK_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_ranks(*args, nproc: int = 2, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node NPROC ARGS` (a script or a command, then its
    arguments); returns the CompletedProcess (stdout and stderr captured as text). The ranks import
    what this process imports (test modules as reward functions), run one intra-op thread each and
    see `env` on top of this environment."""
    args = ["--standalone", f"--nproc-per-node={nproc}", *map(str, args)]
    return subprocess.run(_torchrun(args), capture_output=True, text=True, timeout=timeout, env=_rank_env(env))


def torchrun(command: str, config, tmp_path, nproc: int = 2, timeout: float = 300, overrides=(), env=None):
    """run_ranks of `fusedrl COMMAND --config C.yaml OVERRIDES`, C.yaml holding `config`."""
    return run_ranks(*_fusedrl_args(command, config, tmp_path, nproc, overrides), nproc=nproc,
                     timeout=timeout, env=env)


def stage_run(command: str, config, overrides=(), env=None) -> dict:
    """One step of `torchrun_runs`: `fusedrl COMMAND --config C.yaml OVERRIDES` (C.yaml holding
    `config`), with `env` set in the ranks' environment while it runs."""
    return {"command": command, "config": config, "overrides": list(map(str, overrides)), "env": env or {}}


def rank_0_call(function, *args) -> dict:
    """One step of `torchrun_runs`: `function(*args)` on rank 0 while the other ranks wait (a
    module-level function of a module the ranks can import; arguments JSON-able, paths as text)."""
    return {"call": f"{function.__module__}:{function.__qualname__}", "args": list(map(_json_arg, args))}


def torchrun_runs(steps, tmp_path, nproc: int = 2, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """One `torchrun` launch of NPROC ranks that runs `steps` (stage_run, rank_0_call) in order, in
    one process group (tests/engine/stage_runs_worker.py): a stage run goes through the command's own
    parsing and run-directory checks and calls its stage as `fusedrl STAGE` does, without the
    command's exit between runs. Each run trains as it would in a launch of its own; the ranks'
    start (torch, transformers, the group) is paid once. A failing step fails the launch."""
    launch = f"runs-{nproc}-{next(_LAUNCHES)}"
    plan = []
    for i, step in enumerate(steps):
        if "command" in step:
            path = tmp_path / f"{launch}-{i}-{step['command']}.yaml"
            config_io.save_yaml(step["config"], path)
            step = {**step, "config": str(path)}
        plan.append(step)
    plan_path = tmp_path / f"{launch}.json"
    plan_path.write_text(json.dumps(plan))
    return run_ranks(os.path.join(os.path.dirname(__file__), "stage_runs_worker.py"), plan_path, nproc=nproc,
                     timeout=timeout, env=env)


_LAUNCHES = itertools.count()


def _json_arg(arg):
    return str(arg) if isinstance(arg, os.PathLike) else arg


def torchrun_nodes(command: str, config, tmp_path, nodes: int = 2, nproc: int = 2, timeout: float = 300,
                   overrides=()):
    """The multi-node recipe on this machine: NODES torchrun launches, one per "node" (`--nnodes NODES
    --node-rank R --nproc-per-node NPROC --master-addr 127.0.0.1 --master-port P`, torchrun's static
    rendezvous), started together; returns a CompletedProcess: the first failed launch's return code
    (else 0) and every launch's output. When one fails the others are stopped (their ranks would wait
    on the lost ones until train.dist_timeout_s), as after `timeout` seconds."""
    common = [f"--nnodes={nodes}", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    fusedrl = _fusedrl_args(command, config, tmp_path, nodes * nproc, overrides)
    logs = [open(tmp_path / f"{command}-node-{r}.log", "w+") for r in range(nodes)]
    launches = [subprocess.Popen(_torchrun([*common, f"--node-rank={r}", *fusedrl]), stdout=log,
                                 stderr=subprocess.STDOUT, env=_rank_env(None)) for r, log in enumerate(logs)]
    deadline = time.monotonic() + timeout
    try:
        while (any(launch.poll() is None for launch in launches) and not any(launch.poll() for launch in launches)
               and time.monotonic() < deadline):
            time.sleep(0.2)
    finally:
        for launch in launches:
            if launch.poll() is None:
                _stop(launch)
    output = []
    for log in logs:
        log.seek(0)
        output.append(log.read())
        log.close()
    code = next((launch.returncode for launch in launches if launch.returncode), 0)
    return subprocess.CompletedProcess(launches[0].args, code, "\n".join(output), "")


def _stop(launch: subprocess.Popen) -> None:
    """Stop a torchrun launch: SIGTERM, on which torchrun stops its ranks (each in a session of its
    own, out of reach of a signal to its process group), then SIGKILL if it is still there."""
    launch.terminate()
    try:
        launch.wait(timeout=30)
    except subprocess.TimeoutExpired:
        launch.kill()
        launch.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list) -> list:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _fusedrl_args(command: str, config, tmp_path, nproc: int, overrides) -> list:
    path = tmp_path / f"{command}-{nproc}.yaml"
    config_io.save_yaml(config, path)
    return [_fusedrl_command(), command, "--config", str(path), *overrides]


def _rank_env(env) -> dict:
    # One thread per rank: the ranks share the test machine's cores.
    return {**os.environ, "OMP_NUM_THREADS": str(RANK_THREADS), "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}


def _fusedrl_command() -> str:
    """The installed `fusedrl` script: on PATH, or beside this interpreter (a venv not activated)."""
    beside = os.path.join(os.path.dirname(sys.executable), "fusedrl")
    return shutil.which("fusedrl") or beside


def check(result) -> None:
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"

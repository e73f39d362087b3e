"""patch_model under FSDP2: two torchrun ranks (gloo, CPU) train a patched, fully_shard-ed tiny
Qwen2 on halves of a batch and match the unpatched model on the whole batch
(transformers_patch_worker.py)."""
import os
import pathlib
import subprocess
import sys

WORKER = pathlib.Path(__file__).with_name("transformers_patch_worker.py")


def test_fsdp2_ranks_train_the_patched_model_as_one_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node=2", str(WORKER)], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "FSDP2 OK" in result.stderr

"""Training checkpoints, one layout for every stage and every world size: everything needed to
continue a run exactly, as data only (safetensors and JSON), so resuming runs no code from a
checkpoint.

Layout of `RUN_DIR/checkpoints/step-00000012/`, the same for one process and for N ranks:
    rank-RRRRR.safetensors  each rank's chunks of the tensors (shards.py): the models' and small
                            modules' state dicts and the optimizers' state (FusedAdamW's fp32
                            masters, moments and step counters), a tensor several ranks hold alike
                            written once; plus the rank's own RNG states (torch, CUDA; python's in
                            its metadata)
    checkpoint.json         written by rank 0: the index of every tensor (dtype, global shape, each
                            chunk's file and box), the optimizers' parameter groups
                            (hyperparameters, parameters by name), the schedulers' state dicts and
                            the stage's loop state (counters, data position, PPO's KL coefficient
                            and reward moments)
    manifest.json           every file's size and sha256, written last (engine/runs/durable.py)
Tensor names are in parts.py; any world size resumes a checkpoint of any other (each rank reads the
boxes of its own shards), and a checkpoint that does not fit the run (another model, depth, width,
LoRA rank, precision) is refused with one line naming the difference before anything is loaded
(restore.py).
The directory is first written as a hidden `.step-...tmp-*` sibling and renamed when complete, so a
crash mid-save leaves no `step-*` directory at all: `latest_checkpoint` never sees half a checkpoint
(and `run_training` removes such leftovers when a run starts). Nothing non-finite is written. A
resume verifies the newest checkpoint against its manifest; a corrupt one is renamed
`corrupt-step-*` (kept for inspection, never loaded again) and the previous one is used, with a
warning. When none verifies the resume is refused, naming them (the run is never restarted from
step 0 on its own, dropping its metrics).
"""
from .parts import SavedModel, Trainables
from .restore import CheckpointMismatch
from .store import (checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint,
                    read_tensors, resume, save_checkpoint)

__all__ = ["SavedModel", "Trainables", "CheckpointMismatch", "checkpoint_dir",
           "latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_tensors", "resume",
           "save_checkpoint"]

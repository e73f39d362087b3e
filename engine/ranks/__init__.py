"""The ranks of one `torchrun` job as every layer sees them, below the model and the parallel layout
alike: who this process is and the collectives between ranks (world.py), a sharded model's units
gathered and resharded (sharded.py), and the differentiable collectives of tensor-parallel layers
(tensor_parallel_ops.py). Nothing here imports another engine package."""

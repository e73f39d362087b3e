"""fusedrl engine: the model, generation and trainers built on `kernels` (see the README)."""

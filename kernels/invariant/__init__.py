"""The batch-invariant mode's Triton kernels (`fusedrl.engine.model.invariant` uses them on GPUs): a
fixed-tile matmul, a segment attention over page tables and a per-row log-softmax, each computing a
row's result in an order that does not depend on the other rows of the batch."""

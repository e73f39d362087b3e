"""The batch-invariant mode's ops: Triton kernels (a fixed-tile matmul, a per-row log-softmax) and
fixed-order torch ops, each computing a row's result in an order that does not depend on the other
rows of the batch; `exact` runs one or the other on the model backend, with the mode's
attention (attention.py: the segment kernel or the chunked torch reduction), and is public as
`fusedrl.kernels.exact`."""

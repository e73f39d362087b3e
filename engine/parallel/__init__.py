"""The parallel layout of a job: process groups and ranks, the device mesh, data (FSDP2), tensor
and expert parallelism, and the weights generation reads from them (see docs/parallel.md)."""

"""Attention kernels: the paged KV cache's store and the fused decode step (paged.py)."""

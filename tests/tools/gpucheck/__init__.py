"""The static GPU check (tests/tools/static_gpu.py (this package: its parts)): record Triton launches, compile them ahead of time for
sm_80/sm_90, read registers, spills, shared memory and access widths from the cubins."""

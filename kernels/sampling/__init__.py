"""The split-row Triton sampler (sampler.py) and its kernels: the order keys, noise and packed
winners they share (keys_and_noise.py), the per-chunk statistics and their merge into each row's
bracket (chunk_stats.py) and the window search to the exact cut and the draw (window_draw.py).
Public through `fusedrl.kernels` (`sample`, `sample_triton`, `SamplerWorkspace`)."""

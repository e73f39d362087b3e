"""The split-row Triton sampler (sampler.py) and its kernels: the bit tricks (bits.py), the
per-chunk statistics and bracket merge (bracket.py) and the window search and draw (draw.py).
Public through `fusedrl.kernels` (`sample`, `sample_triton`, `SamplerWorkspace`)."""

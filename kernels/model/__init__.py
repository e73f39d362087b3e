"""The model-scale ops of a decoder's forward: RMSNorm, RoPE, SiLU*up, a decode step's fused norm +
projection, and the mixture-of-experts layer's sort, permutation and grouped GEMM. Public through
`fusedrl.kernels`."""

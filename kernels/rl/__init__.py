"""The RL ops: token log-probs (from logits, or fused with the LM head's matmul), KL penalties,
GAE and whitening, the masked statistics and loss aggregation, and the PPO losses. Public through
`fusedrl.kernels`."""

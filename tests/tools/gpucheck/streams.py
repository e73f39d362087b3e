"""The main memory streams of each Triton kernel, named, with the source text of their accesses.

A stream is (kind, pointer): "ld" or "st", and the kernel argument its addresses derive from;
`compile.py` follows the PTX's data flow from that parameter to the accesses. The check
asks each stream for at least one 128-bit access in an aligned launch: every tensor 16-byte aligned
and every int argument named in SHAPE_ARGS a multiple of 16 (kernels without an entry must be
128-bit at any shape: token_logprobs aligns its rows itself).
"""
STREAMS = {
    "_token_logprobs_fwd_kernel": {"logits rows": ("ld", "logits_ptr")},
    "_token_logprobs_bwd_kernel": {"logits rows": ("ld", "logits_ptr"), "grad rows": ("st", "grad_logits_ptr")},
    "_gae_kernel": {"rewards": ("ld", "rewards_ptr"), "values": ("ld", "values_ptr"), "mask": ("ld", "mask_ptr"),
                    "advantages": ("st", "adv_ptr"), "returns": ("st", "returns_ptr")},
    "_kl_fwd_kernel": {"logp": ("ld", "logp_ptr"), "ref_logp": ("ld", "ref_ptr"), "kl": ("st", "out_ptr")},
    "_kl_bwd_kernel": {"grad_out": ("ld", "grad_out_ptr"), "logp": ("ld", "logp_ptr"),
                       "grad_logp": ("st", "grad_logp_ptr")},
    "_policy_rows_kernel": {"logp": ("ld", "logp_ptr"), "old_logp": ("ld", "old_ptr"), "advantages": ("ld", "adv_ptr"),
                            "d term": ("st", "dterm_ptr")},
    "_value_rows_kernel": {"values": ("ld", "values_ptr"), "returns": ("ld", "returns_ptr"),
                           "d term": ("st", "dterm_ptr")},
    "_scaled_grad_kernel": {"d term": ("ld", "dterm_ptr"), "grad": ("st", "grad_ptr")},
    "_moments_kernel": {"x": ("ld", "x_ptr"), "mask": ("ld", "mask_ptr")},
    "_whiten_kernel": {"x": ("ld", "x_ptr"), "mask": ("ld", "mask_ptr"), "whitened": ("st", "out_ptr")},
    "_add_rms_norm_kernel": {"hidden rows": ("ld", "x_ptr"), "normed rows": ("st", "out_ptr")},
    "_rope_kernel": {"q rows": ("ld", "q_ptr"), "rotated q rows": ("st", "q_out_ptr"), "cos": ("ld", "cos_ptr")},
    "_store_kv_kernel": {"K rows": ("ld", "k_ptr"), "K cache rows": ("st", "k_cache_ptr")},
    "_silu_mul_kernel": {"gate and up": ("ld", "gate_up_ptr"), "product": ("st", "out_ptr")},
    "_paged_decode_kernel": {"K pages": ("ld", "k_cache_ptr"), "V pages": ("ld", "v_cache_ptr")},
    "_fixed_tile_linear_kernel": {"x tiles": ("ld", "x_ptr"), "W tiles": ("ld", "w_ptr")},
    "_norm_linear_kernel": {"W tiles": ("ld", "w_ptr"), "x rows": ("ld", "x_ptr")},
    "_sum_pieces_kernel": {"partial tiles": ("ld", "partial_ptr"), "output": ("st", "out_ptr")},
    "_segment_attention_kernel": {"K rows": ("ld", "k_ptr"), "V rows": ("ld", "v_ptr")},
    "_merge_segments_kernel": {"partial outputs": ("ld", "part_acc_ptr")},
    "_row_logprobs_kernel": {"logits rows": ("ld", "logits_ptr")},
    "_lse_partials_kernel": {"hidden tiles": ("ld", "h_ptr"), "W tiles": ("ld", "w_ptr")},
    "_logit_grad_kernel": {"W tiles": ("ld", "w_ptr"), "logit grads": ("st", "grad_ptr")},
}

# Int arguments that must be multiples of 16 for a launch to count as aligned.
SHAPE_ARGS = {
    "_gae_kernel": ("n_steps",),
    "_kl_fwd_kernel": ("n_elements",),
    "_kl_bwd_kernel": ("n_elements",),
    "_policy_rows_kernel": ("n_steps", "chunk"),
    "_value_rows_kernel": ("n_steps", "chunk"),
    "_scaled_grad_kernel": ("n_elements", "n_steps"),
    "_moments_kernel": ("n_elements",),
    "_whiten_kernel": ("n_elements",),
    "_add_rms_norm_kernel": ("n_cols",),
    "_silu_mul_kernel": ("n_cols",),
    "_rope_kernel": ("q_row_stride", "q_head_stride", "k_row_stride", "k_head_stride"),
    "_store_kv_kernel": ("k_row_stride", "v_row_stride"),
    "_fixed_tile_linear_kernel": ("k_dim", "x_row_stride", "w_row_stride"),
    "_norm_linear_kernel": ("n_out",),
    "_sum_pieces_kernel": ("n_out", "piece_stride"),
    "_row_logprobs_kernel": ("n_cols", "row_stride"),
    "_logit_grad_kernel": ("n_cols",),
}

# GEMM kernels and their weight pointer: a launch with 16-bit weights must compile to tensor-core
# instructions (HGMMA on sm_90, HMMA on sm_80); fp32 launches multiply in full fp32, without them.
TENSOR_CORE_KERNELS = {"_lse_partials_kernel": "w_ptr", "_logit_grad_kernel": "w_ptr",
                       "_grouped_rows_kernel": "b_ptr", "_grouped_weight_grad_kernel": "a_ptr",
                       "_norm_linear_kernel": "w_ptr", "_fixed_tile_linear_kernel": "w_ptr"}

# GEMM kernels that launch as a GEMV at a row tile below 16 rows (the constexpr named here): there
# tile_dot sums the products on the CUDA cores (tl.dot takes 16 rows at least), so no tensor-core
# instruction is wanted, and the streams named here (the activation row, a 1/BLOCK_N share of the
# weight's bytes) are read at whatever width the tile's layout gives ([1, BLOCK_K] over the warps).
GEMV_ROW_TILE = {"_norm_linear_kernel": ("BLOCK_M", ("x rows",))}

# Kernel name prefixes whose failures are expected, with the reason. Remove an entry when its fix lands.
ALLOWED_FAILURES = {
    # k1's gradient is 1 whatever logp is, so the compiler drops the logp load altogether: the
    # stream has no access at all there (the other estimators' launches load it 128 bits wide).
    # A scalar upstream gradient (kl.sum().backward(), GRAD_IS_SCALAR) is one 32-bit load, no stream.
    "_kl_bwd_kernel": "k1 does not read logp in backward (the load is eliminated); a scalar grad_out is one value",
}

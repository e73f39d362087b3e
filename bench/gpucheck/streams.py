"""The main memory streams of each Triton kernel, named, with the source text of their accesses.

A stream is (kind, text): "ld" or "st", and a fragment of the source line(s) of its tl.load /
tl.store. `compile.py` maps the PTX accesses of those lines (by their .loc) to the stream. The check
asks each stream for at least one 128-bit access in an aligned launch: every tensor 16-byte aligned
and every int argument named in SHAPE_ARGS a multiple of 16 (kernels without an entry must be
128-bit at any shape: token_logprobs aligns its rows itself).
"""
STREAMS = {
    "_token_logprobs_fwd_kernel": {"logits rows": ("ld", "z = tl.load(logits_ptr + cols")},
    "_token_logprobs_bwd_kernel": {"logits rows": ("ld", "z = tl.load(logits_ptr + cols"),
                                   "grad rows": ("st", "tl.store(grad_ptr + cols")},
    "_gae_kernel": {"rewards": ("ld", "tl.load(rewards_ptr"), "values": ("ld", "tl.load(values_ptr"),
                    "mask": ("ld", "tl.load(mask_ptr"), "advantages": ("st", "tl.store(adv_ptr"),
                    "returns": ("st", "tl.store(returns_ptr")},
    "_kl_fwd_kernel": {"logp": ("ld", "logp = tl.load(logp_ptr"), "ref_logp": ("ld", "ref = tl.load(ref_ptr"),
                       "kl": ("st", "tl.store(out_ptr")},
    "_kl_bwd_kernel": {"grad_out": ("ld", "tl.load(grad_out_ptr"), "logp": ("ld", "logp = tl.load(logp_ptr"),
                       "grad_logp": ("st", "tl.store(grad_logp_ptr")},
    "_policy_loss_kernel": {"per-token fp32 streams": ("ld", "x = tl.load(x_ptr"),
                            "grad": ("st", "tl.store(grad_ptr")},
    "_value_loss_kernel": {"per-token fp32 streams": ("ld", "x = tl.load(x_ptr"),
                           "grad": ("st", "tl.store(grad_ptr")},
    "_add_rms_norm_kernel": {"hidden rows": ("ld", "x = tl.load(x_ptr"),
                             "normed rows": ("st", "tl.store(out_ptr")},
    "_rope_kernel": {"q/k rows": ("ld", "x1 = tl.load(x_ptr"), "rotated rows": ("st", "tl.store(x_ptr"),
                     "cos": ("ld", "cos = tl.load(cos_ptr")},
    "_store_kv_kernel": {"K/V rows": ("ld", "k = tl.load(k_ptr"), "cache rows": ("st", "tl.store(k_cache_ptr")},
    "_paged_decode_kernel": {"K pages": ("ld", "k = tl.load(k_cache_ptr"), "V pages": ("ld", "v = tl.load(v_cache_ptr")},
    "_combine_splits_kernel": {},
}

# Int arguments that must be multiples of 16 for a launch to count as aligned.
SHAPE_ARGS = {
    "_gae_kernel": ("n_steps",),
    "_kl_fwd_kernel": ("n_elements",),
    "_kl_bwd_kernel": ("n_elements",),
    "_policy_loss_kernel": ("n_elements", "n_steps"),
    "_value_loss_kernel": ("n_elements", "n_steps"),
    "_add_rms_norm_kernel": ("n_cols",),
    "_rope_kernel": ("row_stride", "head_stride"),
    "_store_kv_kernel": ("k_row_stride", "v_row_stride"),
}

# Kernel name prefixes whose failures are expected on this branch, with the reason. Remove an entry
# when its fix lands.
ALLOWED_FAILURES = {
    "_kl_": "data-dependent load masks; fixed on branch issue13",
    "_policy_loss_kernel": "data-dependent load masks; fixed on branch issue13",
    "_value_loss_kernel": "data-dependent load masks; fixed on branch issue13",
}

"""Run in a fresh interpreter that has imported nothing but fusedrl (and torch, which it imports):
every public name of fusedrl.kernels.integrations that can be called, called once on tiny inputs,
its output checked finite (and differentiated where it is a loss). The hosts' libraries (trl,
verl, liger_kernel) must stay unimported, and so must torch.distributed.tensor until the calls
that need transformers, which run last. Prints one JSON line: {name: "ok" or the error}."""
import json
import sys

import fusedrl.kernels.integrations as integrations
import torch

B, T, H, HT, V = 2, 3, 8, 6, 11
gen = torch.Generator().manual_seed(0)


def randn(*shape, grad=False):
    return torch.randn(*shape, generator=gen).requires_grad_(grad)


def head_loss(module, *args, **kwargs):
    """A loss module's scalar loss (the first of a tuple), differentiated to its first input."""
    out = module(*args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, args[0])
    return loss, grad


def tiny_llama():
    import transformers
    config = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config).eval()


def patched_forward(patch, unpatch):
    model = tiny_llama()
    patch(model) if patch is integrations.patch_model else patch("llama")
    try:
        return model(torch.randint(0, V, (1, 4), generator=gen)).logits
    finally:
        unpatch(model) if unpatch is integrations.unpatch_model else unpatch("llama")


ids, mask = torch.randint(0, V, (B, T), generator=gen), torch.ones(B, T)
CALLS = {
    "chunked_divergence_loss": lambda: integrations.chunked_divergence_loss(
        randn(B, T, H, grad=True), randn(B, T, HT), randn(V, H), randn(V, HT), mask, 0.5)[0],
    "FusedLinearJSDLoss": lambda: head_loss(
        integrations.FusedLinearJSDLoss(), randn(B * T, H, grad=True), randn(V, H),
        randn(B * T, HT), randn(V, HT), ids.reshape(-1)),
    "FusedLinearJSD": lambda: head_loss(
        integrations.FusedLinearJSD(), randn(B * T, H, grad=True), randn(V, H), randn(B * T, HT),
        randn(V, HT), None),
    "FusedLinearGRPOLoss": lambda: head_loss(
        integrations.FusedLinearGRPOLoss(), randn(B, T, H, grad=True), randn(V, H), ids, mask,
        randn(B), ref_per_token_logps=-randn(B, T).abs()),
    "FusedLinearPPOLoss": lambda: head_loss(
        integrations.FusedLinearPPOLoss(), randn(B, T, H, grad=True), randn(V, H), ids, mask,
        randn(B, T), -randn(B, T).abs()),
    "gae": lambda: integrations.gae(randn(B, T), randn(B, T), mask),
    "group_advantages_by_uid": lambda: integrations.group_advantages_by_uid(randn(4),
                                                                            [0, 1, 0, 1]),
    "loss_weights": lambda: integrations.loss_weights("grpo", mask, T),
    "masked_whiten": lambda: integrations.masked_whiten(randn(B, T), mask),
    "ppo_value_loss": lambda: integrations.ppo_value_loss(randn(B, T, grad=True), randn(B, T),
                                                          randn(B, T), mask)[0],
    # transformers imports torch.distributed.tensor: these run last
    "patch_model": lambda: patched_forward(integrations.patch_model, integrations.unpatch_model),
    "unpatch_model": lambda: patched_forward(integrations.patch_model,
                                             integrations.unpatch_model),
    "patch_model_type": lambda: patched_forward(integrations.patch_model_type,
                                                integrations.unpatch_model_type),
    "unpatch_model_type": lambda: patched_forward(integrations.patch_model_type,
                                                  integrations.unpatch_model_type),
}


def finite(value) -> bool:
    if isinstance(value, (tuple, list)):
        return all(finite(v) for v in value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    return not torch.is_tensor(value) or bool(torch.isfinite(value).all())


def run(name):
    try:
        return "ok" if finite(CALLS[name]()) else "not finite"
    except Exception as error:    # the report names it
        return f"{type(error).__name__}: {error}"


if __name__ == "__main__":
    loaded = sorted(m for m in ("trl", "verl", "liger_kernel", "transformers",
                                "torch.distributed.tensor") if m in sys.modules)
    public = sorted(name for name in integrations.__all__
                    if callable(getattr(integrations, name)))
    results = {name: run(name) for name in CALLS if name in public}
    print(json.dumps({"loaded_at_start": loaded, "public": public, "called": sorted(CALLS),
                      "results": results}))

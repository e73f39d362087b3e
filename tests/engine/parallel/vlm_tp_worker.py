"""Run by test_vision_tensor_parallel.py under `torchrun --nproc-per-node 2`: each tiny vision-language
model (argv: MODEL_DIR...) laid out for T=2 tensor ranks (the decoder sliced, the vision tower whole on
both) against the same model in one process, on two images and text: fp32 logits within 1e-5, and,
with the tower trained, its gradients equal on both ranks and within 1e-5 of one process's. Asserts;
rank 0 prints "ok" per model."""
import sys

import torch
import torch.distributed as dist

from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.parallel import distributed
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.parallel.tensor_parallel import shard_tensor_parallel
from vision_testing import image_prompt

GRIDS = [(1, 4, 6), (1, 8, 4)]  # two images: 6 and 8 placeholder tokens


def forward(model, ids, pixels, grids):
    """hidden [N, hidden] of the prompt (images encoded by the model's tower)."""
    return model.forward_packed(ids, [len(ids)], pixel_values=pixels, image_grid_thw=grids)


def tower_gradients(model, ids, pixels, grids, weights) -> dict:
    """The tower's gradients of sum(hidden * weights) [N, hidden] (the same loss on every rank)."""
    model.zero_grad(set_to_none=True)
    for p in model.visual.parameters():
        p.requires_grad_(True)
    (forward(model, ids, pixels, grids) * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.visual.named_parameters()}


def check(model_dir: str) -> None:
    one = load_model(model_dir)
    ids, pixels, grids = image_prompt(one.config.hf_config, [[7, 8, 9], [10, 11, 12, 13]], GRIDS)
    weights = torch.randn(len(ids), one.config.hidden_size,
                          generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = one.compute_logits(forward(one, ids, pixels, grids))
    expected_grads = tower_gradients(one, ids, pixels, grids, weights)

    model = shard_tensor_parallel(load_model(model_dir), ParallelDims(2, tensor=2))
    tp = model.tensor_parallel
    # Qwen3-VL's tower holds an nn.Embedding (its patch positions), which is no vocabulary
    assert not any(hasattr(p, "to_local") for p in model.visual.parameters()), "tower sliced"
    with torch.no_grad():
        logits = tp.logits(model.lm_head, forward(model, ids, pixels, grids))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)

    grads = tower_gradients(model, ids, pixels, grids, weights)
    for name, grad in grads.items():
        other = grad.clone()
        dist.broadcast(other, src=0)
        assert torch.equal(other, grad), f"visual.{name}: gradients differ between tensor ranks"
        scale = expected_grads[name].abs().max().clamp_min(1e-12)
        diff = ((grad - expected_grads[name]).abs().max() / scale).item()
        assert diff <= 1e-5, f"visual.{name}: gradient {diff:.2e} off one process's"
    if dist.get_rank() == 0:
        print("ok", flush=True)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    for directory in sys.argv[1:]:
        check(directory)
    distributed.leave(0)  # a barrier first: no rank leaves while the other reads its last broadcast

"""Run by test_tensor_parallel.py under `torchrun --nproc-per-node 2`: tensor-parallel generation
from FSDP2 shards against one process's, speculative decoding included, for each model directory
given (argv: DEVICE DIR...; on cuda the decode steps are CUDA graphs with the all-reduces inside). Asserts; rank 0 prints "ok" per
model."""
import sys

import torch

from fusedrl.engine.parallel import distributed
from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.inference.hybrid_actor import HybridActor
from fusedrl.engine.inference.llm import LLM
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.model.attention import attention_step
from fusedrl.kernels.attention import AttentionMetadata
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.primitives import FORWARD
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.parallel.tensor_parallel import shard_tensor_parallel
from engine_testing import sample_responses

PROMPTS = [[11, 12, 13, 14, 15], [40, 41, 42], [100, 200, 150, 33, 34, 35, 36, 37, 38]]


def local_storage(model):
    return {name: p.to_local().data_ptr() if hasattr(p, "to_local") else p.data_ptr()
            for name, p in model.named_parameters()}


def check(device: str, model_dir: str) -> None:
    greedy = SamplingParams(temperature=0.0, max_new_tokens=12)
    reference = LLM(model_dir, device=device, kv_cache_memory=1 << 22)
    expected = reference.generate(PROMPTS, greedy)
    dims = ParallelDims(2, tensor=2, device_type=torch.device(device).type)
    model = shard_tensor_parallel(load_model(model_dir, device=device), dims)
    tp = model.tensor_parallel
    before = local_storage(model)
    # The same blocks as above: each rank holds half the heads. The hybrid actor gathers nothing.
    actor = HybridActor(model, kv_cache_memory=1 << 21)
    llm = actor.llm
    assert llm.block_manager.num_blocks == reference.block_manager.num_blocks
    assert (llm.runner.graphs is not None) == (device == "cuda")
    try:
        LLM(model, kv_cache_memory=1 << 21, batch_invariant=True)
        raise AssertionError("the batch-invariant mode ran tensor-parallel")
    except ConfigValueError as e:
        assert str(e).startswith("batch_invariant=True with tensor parallelism: not supported")
    for rollout in range(2):
        got = llm.generate(PROMPTS, greedy)
        assert [c.token_ids for o in got for c in o.outputs] == [c.token_ids for o in expected for c in o.outputs]
        for o, e in zip(got, expected):
            diff = (torch.tensor(o.outputs[0].logprobs) - torch.tensor(e.outputs[0].logprobs)).abs().max()
            assert diff < 1e-4, f"sampled log-probs differ by {diff}"
        assert local_storage(model) == before, f"a parameter's storage moved in rollout {rollout}"
    # Speculative decoding on the tensor ranks: every rank drafts, verifies and accepts alike, the
    # greedy tokens one process draws without speculation, in fewer forwards.
    speculative = LLM(model, kv_cache_memory=1 << 21, speculative_tokens=3)
    repeats = SamplingParams(temperature=0.0, max_new_tokens=24)
    plain = [c.token_ids for o in reference.generate(PROMPTS, repeats) for c in o.outputs]
    assert [c.token_ids for o in speculative.generate(PROMPTS, repeats) for c in o.outputs] == plain
    accepted = speculative.take_speculation()["accepted"]
    assert accepted > 0 and distributed.all_gather(accepted) == [accepted] * 2
    # Sampled (not greedy): every tensor rank draws the same tokens.
    sampled = llm.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=8, n=2))
    tokens = [c.token_ids for o in sampled for c in o.outputs]
    assert distributed.all_gather(tokens) == [tokens] * 2
    # The packed training-shaped forward's logits against the whole model's, within fp32 rounding.
    responses = sample_responses(actor, PROMPTS, greedy)[0]
    assert responses == [c.token_ids for o in expected for c in o.outputs]
    assert local_storage(model) == before, "the hybrid actor moved a parameter's storage"
    ids = torch.tensor([t for p in PROMPTS for t in p], device=device)
    seqlens = [len(p) for p in PROMPTS]
    meta = AttentionMetadata.packed(seqlens, ids.device)
    positions = torch.cat([torch.arange(n, device=device) for n in seqlens])
    with torch.no_grad():
        hidden = model.hidden_states(ids, positions, attention_step(meta), tp.prims(FORWARD))
        logits = tp.logits(model.lm_head, hidden)
        whole = reference.model.compute_logits(reference.model.forward_packed(ids, seqlens))
    err = (logits - whole).abs().max() / whole.abs().max()
    assert err < 1e-5, f"logits differ by {err} of their largest"
    if distributed.is_main():
        print(f"ok {model_dir} logits rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    device = sys.argv[1]
    distributed.init_distributed(device, 120)
    for path in sys.argv[2:]:
        check(device if device == "cpu" else f"cuda:{distributed.local_rank()}", path)
    distributed.leave(0)

"""Run by test_persistent_weights.py under `torchrun --nproc-per-node 2`: generation from persistent
gathered buffers (rollout.persistent_weights) against the unshard path (distributed.gathered), on
the same FSDP2-sharded policy. argv: DEVICE DENSE_DIR [MOE_DIR GRPO_ROOT]; on cuda only the first
check, with the decode steps replayed from CUDA graphs. Asserts; rank 0 prints "ok <check>" per check."""
import sys

import torch
from safetensors.torch import load_file

from fusedrl.engine.parallel import distributed
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.data.packing import pack_sequences
from fusedrl.engine.inference.hybrid_actor import HybridActor
from fusedrl.engine.inference.sampling_params import SamplingParams
from fusedrl.engine.parallel.dims import ParallelDims
from fusedrl.engine.parallel.expert_parallel import shard_for_training
from fusedrl.engine.parallel.layout import layout_at_load
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.moe import moe_blocks
from fusedrl.engine.stages.sft import sft_loss
from fusedrl.engine.train import optim
from engine_testing import sample_responses

# Each rank its own prompts, of its own count and lengths: the ranks run different numbers of decode
# steps, which only a walk issuing no collective survives.
PROMPTS = [[[11, 12, 13, 14, 15], [40, 41, 42], [100, 200, 150, 33, 34, 35, 36, 37, 38]], [[7, 8, 9, 10]]]
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=5, n=2, seed=3)


def say(what: str) -> None:
    if distributed.is_main():
        print(f"ok {what}", flush=True)


def actors(policy, device):
    """(the persistent-weights actor, the unshard one) on the same policy."""
    return (HybridActor(policy, kv_cache_memory=1 << 22, device=device, persistent_weights=True),
            HybridActor(policy, kv_cache_memory=1 << 22, device=device))


def greedy() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=6 + 4 * distributed.rank())


def same_rollouts(persistent, gathered, params, exact: bool):
    """Both actors' responses and sampler log-probs for this rank's prompts: equal (bit for bit
    eagerly; a CUDA graph's padded batch may tile its GEMMs otherwise). Returns the persistent one's."""
    prompts = PROMPTS[distributed.rank()]
    responses, logp = sample_responses(persistent, prompts, params)
    want, want_logp = sample_responses(gathered, prompts, params)
    assert responses == want, f"{responses} != {want}"
    if exact:
        assert torch.equal(logp, want_logp)
    else:
        torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-4)
    return responses, logp


def train_step(policy, optimizer, device: str) -> None:
    batch = pack_sequences([([10, 11, 12], [20, 21, 22, 23], True), ([13, 14], [24, 25, 26], True)], device=device)
    (sft_loss(policy, batch, {"tokens": batch.num_targets})[0] * distributed.world_size()).backward()
    optim.clip_and_step([optimizer], 1.0)
    optimizer.zero_grad()


def data_parallel(mode: str, device: str):
    """The layout of a trained model over the world in train.data_parallel `mode`."""
    dims = ParallelDims.data_only(mode, distributed.world_size(), torch.device(device).type)
    return layout_at_load("trained", dims)


def check_rollouts(device: str, model_dir: str) -> None:
    """Two rollouts with a training step between them: the buffers' storage stays, both paths give
    the same tokens and log-probs, and the second rollout sees the updated weights."""
    from torch.distributed.tensor import DTensor
    policy = load_model(model_dir, device=device, shard=data_parallel("shard", device))
    before = {name: distributed.whole_value(p).detach().clone() for name, p in policy.named_parameters()}
    persistent, gathered = actors(policy, device)
    weights = persistent.weights
    assert weights.nbytes >= sum(p.nbytes for p in before.values()) and gathered.llm.runner.graphs is None
    graphs = persistent.llm.runner.graphs
    assert (graphs is not None) == device.startswith("cuda")
    replays = []
    if graphs is not None:
        replay = graphs.replay
        graphs.replay = lambda size: replays.append(size) or replay(size)
    storage = [(w.whole.data_ptr(), w.padded.data_ptr()) for w in weights.wholes.values()]
    with weights.active():  # the buffers hold the whole parameters (the tied head once, uneven shards)
        for name, p in policy.named_parameters():
            assert not isinstance(p, DTensor) and torch.equal(p, before[name]), name
    assert all(isinstance(p, DTensor) for p in policy.parameters()) and not policy.past_fsdp_hooks
    optimizer = optim.build_optimizer(policy, OptimConfig(lr=1e-2))
    first = same_rollouts(persistent, gathered, greedy(), exact=graphs is None)
    replayed = len(replays)
    train_step(policy, optimizer, device)
    second = same_rollouts(persistent, gathered, greedy(), exact=graphs is None)
    assert graphs is None or len(replays) > replayed > 0, (replayed, replays)  # the same graphs, both rollouts
    same_rollouts(persistent, gathered, SAMPLED, exact=graphs is None)
    assert first[0] != second[0] or not torch.equal(first[1], second[1]), "the second rollout saw the old weights"
    assert [(w.whole.data_ptr(), w.padded.data_ptr()) for w in weights.wholes.values()] == storage
    say(f"rollouts {device}, {len(replays)} graph replays")


def check_replicate(model_dir: str) -> None:
    """data_parallel=replicate: every local shard is whole already and read as it is (no buffer)."""
    policy = load_model(model_dir, device="cpu", shard=data_parallel("replicate", "cpu"))
    persistent, gathered = actors(policy, "cpu")
    assert persistent.weights.nbytes == 0
    same_rollouts(persistent, gathered, greedy(), exact=True)
    say("replicate")


def check_exact_lora(model_dir: str) -> None:
    """rollout.exact (the batch-invariant walk) on a LoRA-adapted policy (hooks on the projections,
    adapters whole on every rank, the frozen base sharded)."""
    from fusedrl.engine.config.lora import LoRAConfig
    from fusedrl.engine.train import adapters
    policy = load_model(model_dir, device="cpu", shard=data_parallel("shard", "cpu"))
    lora = adapters.attach(policy, LoRAConfig(rank=4))
    torch.manual_seed(0)  # the same adapters on every rank, B nonzero so that they count
    with torch.no_grad():
        for p in lora.parameters():
            p.normal_(0, 0.1)
    persistent, gathered = (HybridActor(policy, kv_cache_memory=1 << 22, batch_invariant=True, persistent_weights=w)
                            for w in (True, False))
    same_rollouts(persistent, gathered, greedy(), exact=True)
    say("exact lora")


def check_experts(moe_dir: str) -> None:
    """An expert-parallel MoE policy (train.expert_parallel: experts sharded over the ranks): the
    experts gathered into buffers too, every block running them locally while generating."""
    dims = ParallelDims(2, data_shard=2, expert=2)
    policy = load_model(moe_dir, device="cpu", shard=lambda m: shard_for_training(m, dims))
    shards = [b.expert_shard for b in moe_blocks(policy)]
    persistent, gathered = actors(policy, "cpu")
    same_rollouts(persistent, gathered, greedy(), exact=True)
    assert [b.expert_shard for b in moe_blocks(policy)] == shards and all(s is not None for s in shards)
    say("experts")


def check_grpo(root: str) -> None:
    """GRPO with rollout.persistent_weights ends with the weights of the run without it, by default
    and with rollout.exact (whose old-log-prob forward reads the buffers too)."""
    from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
    from fusedrl.engine.stages.ppo.trainer import train_ppo
    for exact in (False, True):
        for persistent in (False, True):
            rollout = RolloutConfig(prompts_per_iteration=2, samples_per_prompt=3, max_new_tokens=6,
                                    kv_cache_memory=1 << 22, persistent_weights=persistent, exact=exact)
            train_ppo(GRPOConfig(policy=f"{root}/policy", prompts_file=f"{root}/prompts.jsonl",
                                 output_dir=f"{root}/run-{exact}-{persistent}",
                                 reward_fn="reward_testing:vowel_fraction",
                                 rollout=rollout, optim=OptimConfig(lr=1e-3),
                                 ppo=UpdateConfig(estimator="grpo", kl_loss_coef=0.05, vf_coef=0.0, epochs=1,
                                                  minibatch_size=6),
                                 train=LoopConfig(iterations=2, progress=False, device="cpu", precision="fp32")))
        distributed.barrier()
        a, b = (load_file(f"{root}/run-{exact}-{p}/final/model.safetensors") for p in (False, True))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"exact={exact}"
    say("grpo")


if __name__ == "__main__":
    device = sys.argv[1]
    distributed.init_distributed(device, 120)
    if device == "cuda":
        check_rollouts(f"cuda:{distributed.local_rank()}", sys.argv[2])
    else:
        torch.set_num_threads(1)
        check_rollouts("cpu", sys.argv[2])
        check_replicate(sys.argv[2])
        check_exact_lora(sys.argv[2])
        check_experts(sys.argv[3])
        check_grpo(sys.argv[4])
    distributed.leave(0)

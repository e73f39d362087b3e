"""The plan of Qwen2.5 shapes (config.json alone, tests/tools/plan_table.py) on one node of 8 x 80 GB: what
fits today and why the rest does not. The 14B and larger runs recompute activations
(train.gradient_checkpointing), as such runs do: without it a 16-row micro-batch of 320 tokens
keeps ~40 GB of a 14B model's activations."""
import json

import plan_table  # tests/tools/plan_table.py (on the tests' path)
import pytest

from fusedrl.engine import cli
from fusedrl.engine.cli import STAGES
from fusedrl.engine.plan.command import plan_config
from fusedrl.engine.plan.phases import model_rows
from fusedrl.engine.plan.planner import plan_stage, stage_setup

GB = 10**9
NODE = dict(gpus=8, gpu_memory=80 * GB)
CKPT = "train.gradient_checkpointing=true"
POOL = "rollout.kv_cache_memory=268435456"  # a fixed 256 MiB pool: the rest is the point


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return {size: plan_table.write_config(root, size) for size in plan_table.QWEN25}


def config(stage, model_dir, *overrides):
    reward = (f"reward_model={model_dir}",) if stage == "ppo" else ("reward_fn=rewards:score",)
    return plan_config(stage, STAGES[stage][0], None, [f"policy={model_dir}", *reward, *overrides])


def plan(stage, model_dir, *overrides, advise=False):
    return plan_stage(config(stage, model_dir, *overrides), NODE["gpus"], NODE["gpu_memory"], advise=advise)


def test_qwen_shapes_have_their_published_sizes(qwen):
    """Parameter counts of the published models (7.62B, 14.77B, 32.76B, 72.71B; tied 0.49B, 1.54B)."""
    expected = {"0.5B": 0.494, "1.5B": 1.544, "7B": 7.616, "14B": 14.770, "32B": 32.764, "72B": 72.706}
    for size, billions in expected.items():
        policy = model_rows(stage_setup(config("grpo", qwen[size]), NODE["gpus"]))[0]
        assert policy["parameters"] / 1e9 == pytest.approx(billions, abs=1e-3), size


def test_14b_grpo_fits(qwen):
    result = plan("grpo", qwen["14B"], CKPT, POOL)
    assert result.fits and result.peak < 70 * GB
    # Both models loaded sharded (59 GB of bf16 weights, 1/8 of it per GPU), the whole policy
    # gathered for generation on top of the shards and the optimizer state.
    assert result.total("load") == pytest.approx(59.1 * GB / 8, rel=0.01)
    assert result.phases["rollout"]["gathered"] == pytest.approx(29.5 * GB, rel=0.01)
    # The export streams one parameter at a time: the largest, the 152k x 5120 bf16 embedding, 1.6 GB.
    assert result.phases["export"]["gathered"] == pytest.approx(1.56 * GB, rel=0.01)


@pytest.mark.parametrize("lora", [(), ("lora.rank=64",)])
def test_72b_grpo_does_not_fit_at_tensor_parallel_1(qwen, lora):
    """Full or LoRA (its frozen base sharded), generation gathers the whole 145 GB policy on a GPU,
    which no option (offload, LoRA, token budget) helps: the advice says so."""
    result = plan("grpo", qwen["72B"], CKPT, *lora, advise=True)
    assert not result.fits
    rollout = result.phases["rollout"]
    assert rollout["gathered"] > 145 * GB and rollout["weights"] < 40 * GB
    assert "no change tried fits" in result.notes[-1]
    assert "generation gathers the whole policy" in " ".join(result.notes)


def test_14b_ppo_does_not_fit_as_is_and_fits_with_the_optimizer_offloaded(qwen):
    """Four 14B models, loaded sharded: the run does not fit (the whole policy gathered for
    generation on top of two trained models' optimizer state) and fits once the optimizer state is
    in CPU memory."""
    as_is = plan("ppo", qwen["14B"], CKPT, advise=True)
    assert not as_is.fits and as_is.peak_phase in ("rollout", "update")
    assert "offload the optimizer state" in as_is.notes[0]
    offloaded = plan("ppo", qwen["14B"], CKPT, "train.optimizer_offload=true")
    assert offloaded.fits
    assert offloaded.phases["update"]["optimizer"] == 0 and offloaded.host_optimizer_bytes == \
        as_is.phases["update"]["optimizer"]


def test_the_command_prints_one_json_object(qwen, capsys):
    code = cli.main(["plan", "grpo", f"policy={qwen['7B']}", "--gpus", "8", "--gpu-memory", "80GB", "--json", CKPT])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert report["fits"] is True and report["gpus"] == 8 and report["gpu_memory"] == 80 * GB
    assert set(report["phases"]) == {"load", "rollout", "scoring", "update", "export"}
    for phase in report["phases"].values():
        assert set(phase) == {"weights", "grads", "optimizer", "kv_pool", "gathered", "activations", "total"}
        assert phase["total"] == sum(v for k, v in phase.items() if k != "total")
    assert report["peak_bytes"] == max(p["total"] for p in report["phases"].values())


def test_14b_ppo_offloading_moves_the_trained_shards_and_state_to_cpu_memory(qwen):
    """14B PPO does not fit as is and fits with train.optimizer_offload, which moves the trained models' shards, gradients and optimizer state to CPU memory (FSDP2's
    CPUOffloadPolicy, as distributed.shard applies it); the frozen reference and reward model stay."""
    as_is = plan("ppo", qwen["14B"], CKPT)
    offloaded = plan("ppo", qwen["14B"], CKPT, "train.optimizer_offload=true")
    assert not as_is.fits and offloaded.fits
    for phase in ("rollout", "scoring", "update"):
        assert offloaded.phases[phase]["optimizer"] == 0
        assert offloaded.phases[phase]["weights"] < as_is.phases[phase]["weights"]   # trained shards in CPU memory
    assert offloaded.host_optimizer_bytes == as_is.phases["update"]["optimizer"] > 0
    # train.frozen_offload: the reference's and the reward model's bf16 shards (2 x 14.77B x 2 / 8 bytes) leave too.
    frozen = plan("ppo", qwen["14B"], CKPT, "train.optimizer_offload=true", "train.frozen_offload=true")
    assert offloaded.phases["rollout"]["weights"] - frozen.phases["rollout"]["weights"] == \
        pytest.approx(2 * 14.77e9 * 2 / 8, rel=0.01)
    # One process offloads nothing (training refuses the option there): the plan says the same.
    one = plan_stage(config("ppo", qwen["14B"], CKPT, "train.optimizer_offload=true"), 1, 80 * GB)
    assert one.host_optimizer_bytes == 0


def test_the_scoring_forwards_hold_one_token_budget(qwen):
    """rollout.tokens_per_forward bounds the scoring phase's activations (16 x 4 rows of 320 tokens here)."""
    rows = ("rollout.prompts_per_iteration=16", "rollout.samples_per_prompt=4",
            "train.prefix_sharing=false")
    whole = plan("ppo", qwen["7B"], CKPT, *rows, "rollout.tokens_per_forward=null").phases["scoring"]["activations"]
    cut = plan("ppo", qwen["7B"], CKPT, *rows, "rollout.tokens_per_forward=2048").phases["scoring"]["activations"]
    held = plan("ppo", qwen["7B"], CKPT, *rows, "rollout.tokens_per_forward=20480").phases["scoring"]["activations"]
    # The rows' 20480 tokens in one forward; a tenth of them (plus the LM head's chunk).
    assert held == whole and cut < whole / 3


def test_a_released_kv_pool_is_counted_in_the_rollout_only_where_graphs_allow(qwen):
    kept = plan("grpo", qwen["7B"], CKPT, "rollout.kv_cache_memory=8000000000")
    released = plan("grpo", qwen["7B"], CKPT, "rollout.kv_cache_memory=8000000000", "rollout.release_kv_pool=true")
    assert released.phases["rollout"]["kv_pool"] == kept.phases["rollout"]["kv_pool"] > 0
    for phase in ("scoring", "update", "export"):
        assert released.phases[phase]["kv_pool"] == 0 < kept.phases[phase]["kv_pool"]
    # One process on CUDA captures decode graphs, which hold the pool: it stays.
    one = plan_stage(config("grpo", qwen["7B"], CKPT, POOL, "rollout.release_kv_pool=true"), 1,
                     80 * GB)
    assert one.phases["update"]["kv_pool"] == one.phases["rollout"]["kv_pool"] > 0


def test_persistent_weights_keep_the_whole_policy_in_every_phase(qwen):
    """rollout.persistent_weights: the 7B policy whole (15.2 GB in bf16) beside its shards in every
    phase after load, nothing gathered to generate (nor for rollout.exact's old log-probs), and the
    KV pool kept (decode graphs hold it); replicated data parallelism reads its whole shards as they
    are (no bytes)."""
    released = "rollout.release_kv_pool=true"
    base = plan("grpo", qwen["7B"], CKPT, released)
    kept = plan("grpo", qwen["7B"], CKPT, released, "rollout.persistent_weights=true")
    whole = kept.models[0]["bytes"]
    assert whole == pytest.approx(15.23 * GB, rel=0.01)
    assert kept.phases["load"] == base.phases["load"]
    for phase in ("rollout", "scoring", "update", "export"):
        assert kept.phases[phase]["weights"] - base.phases[phase]["weights"] == whole, phase
    assert kept.phases["rollout"]["gathered"] == 0 < base.phases["rollout"]["gathered"] == whole
    assert kept.phases["update"]["kv_pool"] == kept.phases["rollout"]["kv_pool"] > 0 == base.phases["update"]["kv_pool"]
    replicated = [plan("grpo", qwen["7B"], CKPT, "train.data_parallel=replicate", *extra).phases["update"]["weights"]
                  for extra in ((), ("rollout.persistent_weights=true",))]
    assert replicated[0] == replicated[1]
    # rollout.exact's old-log-prob forward reads the buffers instead of gathering the policy again.
    gathered, read = (plan("grpo", qwen["7B"], CKPT, "rollout.exact=true", *extra).phases["scoring"]["gathered"]
                      for extra in ((), ("rollout.persistent_weights=true",)))
    assert gathered == whole > read


def test_sft_forwards_from_cuda_graphs_hold_their_activations_through_the_step(qwen):
    """train.cuda_graphs: the graphs' memory pool keeps a forward's activations while the
    optimizer's step buffers are made, so the update phase holds both (one GPU, 0.5B)."""
    def sft(graphs):
        cfg = plan_config("sft", STAGES["sft"][0], None, [
            f"model={qwen['0.5B']}", "data.train_file=x.jsonl", "data.tokens_per_batch=16384",
            "data.max_length=4096", "train.gradient_checkpointing=false",
            f"train.cuda_graphs={str(graphs).lower()}"])
        return plan_stage(cfg, 1, NODE["gpu_memory"]).phases["update"]
    called, replayed = sft(False), sft(True)
    assert "activations" in called and replayed["activations"] == called["activations"]
    step_buffers = replayed["grads"] - called["grads"]
    assert step_buffers > 0  # the fp32 gradient copy of the step
    assert sum(replayed.values()) == sum(called.values()) + step_buffers

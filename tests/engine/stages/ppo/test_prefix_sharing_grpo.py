"""train.prefix_sharing end to end: GRPO (fp32, groups of 4, 3 iterations, the later ones sampled
from the updated weights) reading each group's prompt once ends where reading every row whole ends,
the first update's gradients equal up to fp32 rounding, and its forwards embed each prompt once per
group. On torch's kernels, as on a machine without the Triton
interpreter: the shared layout is under test here, the fused kernels on it in test_gpu_rl."""
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.data.prompts import load_prompts
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.kernels import use_backend
from transformers import AutoTokenizer
from train_testing import save_tiny_model, write_jsonl

GROUP = 4
ITERATIONS = 3


def grpo(root, policy_dir, prompts, share: bool):
    cfg = GRPOConfig(policy=str(policy_dir), prompts_file=str(prompts),
                     output_dir=str(root / f"share-{share}"),
                     reward_fn="reward_testing:vowel_fraction",
                     rollout=RolloutConfig(prompts_per_iteration=2, samples_per_prompt=GROUP,
                                           max_new_tokens=6, kv_cache_memory=1 << 22),
                     ppo=UpdateConfig(estimator="grpo", epochs=1, minibatch_size=8, vf_coef=0.0,
                                      kl_loss_coef=0.01),
                     train=LoopConfig(iterations=ITERATIONS, progress=False, device="cpu", precision="fp32",
                                      prefix_sharing=share))
    embedded = []  # ids each embedding lookup reads: sampler, scoring and update forwards alike

    def count(module, args):
        if isinstance(module, torch.nn.Embedding):
            embedded.append(args[0].numel())
    steps = []  # each optimizer step's gradients, as the step reads them (after clipping)

    def gradients(optimizer, args, kwargs):
        steps.append([p.grad.clone() for group in optimizer.param_groups
                      for p in group["params"] if p.grad is not None])
    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(count),
             register_optimizer_step_pre_hook(gradients)]
    try:
        with use_backend("torch"):
            final = train_ppo(cfg)
    finally:
        for hook in hooks:
            hook.remove()
    train = [r for r in read_metrics(root / f"share-{share}") if r["kind"] == "train"]
    return load_model(final).state_dict(), train, embedded, cfg, steps[0]


def test_grpo_with_prefix_sharing_ends_where_whole_rows_end(tmp_path):
    policy_dir = save_tiny_model(tmp_path / "policy")
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": "the quick brown fox"}, {"prompt": "lazy dog"}])
    whole, whole_metrics, whole_embedded, cfg, whole_grads = grpo(tmp_path, policy_dir, prompts,
                                                                  share=False)
    shared, shared_metrics, shared_embedded, _, shared_grads = grpo(tmp_path, policy_dir, prompts,
                                                                    share=True)
    # One update: the same gradients up to fp32 rounding of sums taken in another order (a
    # prompt's gradient summed over its answers at once), relative to each tensor's norm.
    assert len(whole_grads) == len(shared_grads) > 0
    for a, b in zip(whole_grads, shared_grads):
        assert float((b - a).norm() / a.norm()) <= 1e-6
    # Adam turns a gradient's rounding into steps of up to the learning rate where a gradient is
    # ~0 (rewards equal in a group, a KL term near its minimum): the weights after 3 iterations.
    for name, weight in whole.items():
        assert float((shared[name] - weight).norm() / weight.norm()) <= 1e-5, name
    # Both prompts in every iteration: the group's other 3 rows do not read their prompt again.
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    drawn = load_prompts(cfg.prompts_file, tokenizer, cfg.rollout.max_prompt_length, 128)[0]
    prompt_tokens = sum(len(p.ids) for p in drawn)
    assert len(shared_metrics) == ITERATIONS
    for a, b in zip(whole_metrics, shared_metrics):
        assert a["forwarded_tokens"] == a["row_tokens"]
        assert b["forwarded_tokens"] == b["row_tokens"] - (GROUP - 1) * prompt_tokens
        # The reference, old log-prob and update forwards each embed exactly the shared stream.
        assert shared_embedded.count(b["forwarded_tokens"]) >= 3
        assert b["row_tokens"] not in shared_embedded
        assert whole_embedded.count(a["row_tokens"]) >= 3

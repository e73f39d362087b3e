"""Multi-turn GRPO under torchrun (2 CPU ranks over gloo): trajectories of an environment of three
turns, each rank rolling out its own prompts, end with the weights of one process that rolls out
all of them with the same seed (the ranks agree on the update). Both draw the same trajectories by
construction: in rollout.exact a row's logits do not depend on the batch it is decoded in (one
process decodes 8 rows a step, each rank 4; in the default kernels the rounding of a step depends
on its batch, and a draw near a tie of the Gumbel argmax takes another token), and an environment's
reply rejoins the batch at a point set by the tokens, not by when it came (inference/multi_turn.py).
One iteration: a second would sample from weights that the two runs' all-reduces rounded apart."""
import pytest
import torch
from safetensors.torch import load_file

import fusedrl.kernels as kernels
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig, RolloutConfig, UpdateConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.stages.ppo.trainer import train_ppo
from fusedrl.engine.train.runlog import read_metrics
from agent_testing import save_chat_model
from dist_testing import check, rank_threads, torchrun
from train_testing import write_jsonl

PROMPTS = ["hello world", "the brown dog", "lazy fox", "over the"]


def config(root, name, ranks):
    # 4 prompts x 2 trajectories in all (per rank: 4 // ranks prompts); one minibatch of the whole
    # rollout, so the update does not depend on how the rows are split.
    return GRPOConfig(policy=str(root / "chat"), prompts_file=str(root / "prompts.jsonl"),
                      output_dir=str(root / name),
                      rollout=RolloutConfig(prompts_per_iteration=4 // ranks, samples_per_prompt=2, max_new_tokens=6,
                                            kv_cache_memory=1 << 22, max_prompt_length=40, temperature=1.0,
                                            environment="agent_envs:ThreeTurns", max_turns=3,
                                            exact=True),
                      ppo=UpdateConfig(epochs=1, minibatch_size=8 // ranks, estimator="grpo", kl_loss_coef=0.01),
                      optim=OptimConfig(lr=1e-4),
                      train=LoopConfig(iterations=1, progress=False, device="cpu"))


def test_two_ranks_train_multi_turn_trajectories_as_one_process(tmp_path):
    save_chat_model(tmp_path / "chat")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    # The ranks' agreement is under test, not the kernels (the interpreter would run every program
    # of the RL kernels in Python): both runs on the torch backend.
    with rank_threads(), kernels.use_backend("torch"):
        train_ppo(config(tmp_path, "one", 1))
    check(torchrun("grpo", config(tmp_path, "two", 2), tmp_path, timeout=150,
                   env={"FUSEDRL_BACKEND": "torch"}))
    train = [r for r in read_metrics(tmp_path / "two") if r["kind"] == "train"]
    alone = [r for r in read_metrics(tmp_path / "one") if r["kind"] == "train"]
    # The same trajectories and scores in both runs, so what follows compares the update alone
    # (the mean of 8 fp32 scores in float64, summed in another order over the ranks).
    assert [r["tokens"] for r in alone] == [r["tokens"] for r in train]
    assert [r["score_mean"] for r in alone] == pytest.approx([r["score_mean"] for r in train],
                                                             rel=1e-12)
    assert len(train) == 1 and all(len(r["tokens_per_rank"]) == 2 for r in train)
    for r in train:  # every rank's trajectories ran their turns, the loss on the model's tokens only
        assert r["turns/mean"] >= 2.5 and r["tokens/environment"] > r["tokens/model"] > 0
        assert r["env/errors"] == r["env/timeouts"] == 0
    # exact across turns: the trainer's old log-probs are the sampler's, bit for bit
    assert all(r["logprob_mismatch_max"] == 0.0 for r in alone + train)
    one, two = (load_file(tmp_path / name / "final" / "model.safetensors") for name in ("one", "two"))
    start = load_file(tmp_path / "chat" / "model.safetensors")
    assert any(not torch.equal(start[name], two[name]) for name in two)  # it trained
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-6)

"""GRPO context-parallel under torchrun (gloo CPU ranks, engine/parallel/context_parallel.py): a context
group's ranks sample its rows alike (its first rank's kept, its first rank alone calling the reward
function), and every scoring forward (reference, old log-probs) and training forward runs on each
rank's half of the pack. rollout.prompts_per_iteration and ppo.minibatch_size are per data rank (a
context group is one), so C=2 on 2 ranks and C=2 x T=2 on 4 ranks (the tensor slices sharded over
the context ranks) run one process's config, and C=2 x 2 data ranks on 4 ranks half of each size
per group; all train one process's weights within 1e-4, LoRA adapters at C=2 too."""
import os

import pytest

from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from fusedrl.engine.stages.ppo.trainer import train_ppo
from dist_testing import check, rank_threads, stage_run, torchrun_runs
from test_ppo_tensor_parallel import grpo_config, max_relative_diff, records, train_metrics
from train_testing import save_tiny_model, write_jsonl


def with_lora(cfg):
    """cfg with LoRA adapters on the policy (the reference: the policy with them off), Adam's eps
    1e-3: B starts at 0, so an element whose gradient is the rounding of the ranks' sum alone would
    take steps of order lr against a max |B| of only ~lr x steps; eps 1e-3 bounds its move by
    1e-2 x that rounding (the error model of tests/engine/train/test_context_parallel_training.py)."""
    cfg.lora = LoRAConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj,gate_proj,down_proj")
    cfg.optim = OptimConfig(lr=1e-3, eps=1e-3)
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo_cp")
    # llama2, as in test_ppo_tensor_parallel: no k_proj bias, whose true gradient is 0 (softmax ignores
    # it): Adam turns the rounding of the shards' sum into lr-sized steps there (1.6e-4 of max |b| with
    # qwen2's biases after 2 iterations, every other weight within 1e-5).
    save_tiny_model(root / "policy")
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in ["the quick brown", "hello world", "lazy dog",
                                                                  "fox jumps", "over the", "brown fox"]])
    for name in ("one", "c2", "c2dp2", "c2t2", "one_lora", "c2_lora"):
        (root / f"rec-{name}").mkdir()

    def run(name, cfg):
        return stage_run("grpo", cfg, env={"RECORD_DIR": str(root / f"rec-{name}")})
    check(torchrun_runs([run("c2", grpo_config(root, "c2", context_parallel=2)),
                         run("c2_lora", with_lora(grpo_config(root, "c2_lora", context_parallel=2)))], root))
    check(torchrun_runs([run("c2dp2", grpo_config(root, "c2dp2", 2, context_parallel=2)),
                         run("c2t2", grpo_config(root, "c2t2", 1, 2, context_parallel=2))], root, nproc=4,
                        timeout=400))
    try:
        with rank_threads():
            for name, cfg in (("one", grpo_config(root, "one")), ("one_lora", with_lora(grpo_config(root, "one_lora")))):
                os.environ["RECORD_DIR"] = str(root / f"rec-{name}")
                train_ppo(cfg)
    finally:
        del os.environ["RECORD_DIR"]
    return root


@pytest.mark.parametrize("run", ["c2", "c2dp2", "c2t2"])
def test_context_ranks_train_one_process_s_weights(runs, run):
    assert max_relative_diff(runs / "one" / "final", runs / run / "final") <= 1e-4
    for key in ("loss", "kl_loss", "score_mean", "grad_norm"):
        assert train_metrics(runs / run, key) == pytest.approx(train_metrics(runs / "one", key), rel=1e-4), key
    assert train_metrics(runs / run, "tokens") == train_metrics(runs / "one", "tokens")


def test_a_context_group_scores_its_rows_once(runs):
    one = records(runs / "rec-one", 0)
    assert records(runs / "rec-c2", 0) == one and records(runs / "rec-c2", 1) == []
    # At C=2 x D=2 the data ranks 0 and 2 (each group's first) score half of the rows each.
    assert sorted(records(runs / "rec-c2dp2", 0) + records(runs / "rec-c2dp2", 2)) == sorted(one)
    assert records(runs / "rec-c2dp2", 1) == records(runs / "rec-c2dp2", 3) == []
    # At C=2 x T=2 one data rank of 4: its first rank alone.
    assert records(runs / "rec-c2t2", 0) == one
    assert records(runs / "rec-c2t2", 1) == records(runs / "rec-c2t2", 2) == records(runs / "rec-c2t2", 3) == []


def test_lora_adapters_train_context_parallel(runs):
    assert max_relative_diff(runs / "one_lora" / "final_adapter", runs / "c2_lora" / "final_adapter",
                             WEIGHTS_FILE) <= 1e-4
    assert train_metrics(runs / "c2_lora", "loss") == pytest.approx(train_metrics(runs / "one_lora", "loss"), rel=1e-4)

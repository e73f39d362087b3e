"""SFT context-parallel under torchrun (engine/parallel/context_parallel.py, gloo CPU ranks): each
rank forwards its half of every packed micro-batch, and the exported model equals one process's with
the same global batch within 1e-5 (ADAM_EPS says why that bound holds): on 2 ranks at
train.context_parallel=2, and on 4 ranks at context 2 x 2 data ranks (FSDP2 over all 4) against one
process with optim.grad_accum_steps=2, and on 4 ranks at context 2 x tensor 2 (the tensor slices
sharded over the context ranks); resumed at C=2 from a step-2 checkpoint too, and with LoRA adapters
at C=2."""
import pytest
from safetensors.torch import load_file

from fusedrl.engine.stages.sft import train_sft
from fusedrl.engine.train.runlog import read_metrics
from dist_testing import check, rank_0_call, rank_threads, stage_run, torchrun_runs
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.model.peft_io import WEIGHTS_FILE
from test_tensor_parallel_training import LOOP, max_relative_diff
from train_testing import copy_checkpoint, demonstrations, save_tiny_model, sft_config, write_jsonl


LORA = LoRAConfig(rank=4, alpha=8.0, target_modules="q_proj,v_proj,gate_proj,down_proj")
# The error model of the weights' comparison. The context split sums a gradient's terms in another
# order, so an element's gradient differs by its fp32 rounding d. AdamW's
# step g / (|g| + eps) (step 1; later steps alike) moves by at most d / eps, so after the run's steps
# a weight differs by at most sum(lr_t) * d / eps: with eps = 1e-6 that is up to 1e3 * lr * d for an
# element whose gradient is rounding alone (the key bias: softmax ignores q . b_k, its true
# gradient is 0), measured at 6e-5 to 2.5e-4 of max |w| depending on the machine's matmul order.
# With eps = 1e-3 the same d moves a weight by at most 1e-2 * d: every tensor, key bias included,
# within 7e-7 of max |w| (measured), well inside MAX_WEIGHT_DIFF. Elements with real gradients
# (|g| >> eps) still take Adam's normalized step.
ADAM_EPS = 1e-3
MAX_WEIGHT_DIFF = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_cp")
    base = save_tiny_model(root / "base", arch="qwen2")  # 2 key/value heads, tied head, q/k/v biases
    # Beside tensor slices llama2, as test_tensor_parallel_training: another architecture (no k_proj bias).
    llama2 = save_tiny_model(root / "llama2")
    write_jsonl(root / "train.jsonl", demonstrations(24))

    def config(name, accum, c=1, model=base, lora=None, **loop):
        return sft_config(model, root / "train.jsonl", root / name, optim={"grad_accum_steps": accum, "eps": ADAM_EPS},
                          train={**LOOP, "context_parallel": c, **loop}, **({"lora": lora} if lora else {}))
    # One launch per world size. Resumed at C=2 from the first run's step-2 checkpoint; LoRA adapters
    # (whole on every rank, their gradients averaged over the world: the sum over a group).
    check(torchrun_runs([stage_run("sft", config("c2", 1, 2, save_every=2)),
                         rank_0_call(copy_checkpoint, root / "c2", 2, root / "c2_resumed"),
                         stage_run("sft", config("c2_resumed", 1, 2)),
                         stage_run("sft", config("c2_lora", 1, 2, lora=LORA))], root))
    # Each layer recomputed in backward at C=2 x D=2 (the key/value gather runs again), as one process
    # is not; context 2 x tensor 2: one data rank, each tensor group forwards a half of the pack.
    check(torchrun_runs([stage_run("sft", config("c2dp2", 1, 2, gradient_checkpointing=True)),
                         stage_run("sft", config("c2t2", 1, 2, llama2, tensor_parallel=2))], root, nproc=4,
                        timeout=400))
    with rank_threads():
        train_sft(config("one", 1))
        train_sft(config("one_accum2", 2))
        train_sft(config("one_llama2", 1, model=llama2))
        train_sft(config("one_lora", 1, lora=LORA))
    return root


def train_records(run):
    return [r for r in read_metrics(run) if r["kind"] == "train"]


@pytest.mark.parametrize("run, one", [("c2", "one"), ("c2dp2", "one_accum2"), ("c2_resumed", "one"),
                                      ("c2t2", "one_llama2")])
def test_context_ranks_train_one_process_s_weights(runs, run, one):
    assert max_relative_diff(runs / one / "final", runs / run / "final") <= MAX_WEIGHT_DIFF
    got, want = train_records(runs / run), train_records(runs / one)
    want = want[-len(got):]  # resumed at step 2: its last step
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    assert [r["grad_norm"] for r in got] == pytest.approx([r["grad_norm"] for r in want], rel=1e-5)
    assert [r["tokens"] for r in got] == [r["tokens"] for r in want]
    assert all(len(set(r["tokens_per_rank"][:2])) == 1 for r in got)  # a context group's ranks: the same pack


def test_the_held_out_evaluation_runs_context_parallel_too(runs):
    """The run's last evaluation (data.eval_fraction's held-out example): every rank forwards its shard."""
    got, want = ([r["loss"] for r in read_metrics(runs / name) if r["kind"] == "eval"] for name in ("c2", "one"))
    assert got and got == pytest.approx(want, rel=1e-5)


def test_lora_adapters_train_context_parallel(runs):
    one, two = (load_file(runs / run / "final_adapter" / WEIGHTS_FILE) for run in ("one_lora", "c2_lora"))
    assert one.keys() == two.keys()
    for name in one:
        assert (two[name] - one[name]).abs().max() <= MAX_WEIGHT_DIFF * one[name].abs().max(), name

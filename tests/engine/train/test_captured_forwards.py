"""SFT's and the reward model's forwards replayed from CUDA graphs (train.cuda_graphs;
engine/train/captured_forwards.py): on the CPU the same buckets run eagerly on the same padded
buffers, so a step there gives the eager step's metrics and weights, its gradients shared by every
bucket, a pack whose columns do not fit taking the eager loss; where a run cannot replay, one line
says why. The graphs themselves: the gpu test."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from fusedrl.engine.data.packing import collate_rm, collate_sft
from fusedrl.engine.data.tokenization import TokenizedExample
from fusedrl.engine.errors import UsageError
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.reward_model import reward_model_from_lm
from fusedrl.engine.parallel import distributed
from fusedrl.engine.stages.rm import rm_captured, rm_stage, train_rm
from fusedrl.engine.stages.sft import SFT_CAPTURED, sft_stage, train_sft
from fusedrl.engine.train import captured_forwards, supervised
from fusedrl.engine.train.captured_forwards import CapturedForwards, blocker, bucket_sequences
from fusedrl.engine.train.optim import build_optimizer, build_scheduler
from fusedrl.engine.train.runlog import read_metrics
from fusedrl.engine.train.supervised import train_step
from moe_testing import save_moe_base
from train_testing import (demonstrations, rm_config, save_tiny_model, sft_config,
                           sorted_digit_preferences, write_jsonl)

CPU = torch.device("cpu")


@pytest.fixture
def base_dir(qwen2_dir):  # tied embeddings
    return qwen2_dir


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("graphs_data") / "train.jsonl", demonstrations(24))


def packs(seed=0):
    """Three forwards of one step: 3, 11 and 1 sequences (buckets of 8, 16 and 8 sequences), an
    empty prompt among them (its first response token has no target)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for count in (3, 11, 1):
        examples = []
        for _ in range(count):
            prompt_len, answer_len = (int(x) for x in torch.randint(0, 6, (2,), generator=g))
            ids = torch.randint(3, 200, (prompt_len + answer_len + 1,), generator=g).tolist()
            examples.append(TokenizedExample(ids[:prompt_len], (ids[prompt_len:],)))
        out.append(collate_sft(examples))
    return out


def steps(base_dir, cfg, captured: bool, rounds=2, loss=SFT_CAPTURED):
    """Metrics of `rounds` optimizer steps over packs(), and the weights after them (captured:
    each forward through a CapturedForwards of `loss`)."""
    model = load_model(base_dir)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    stage = sft_stage("float32", CPU)
    forwards = CapturedForwards(model, loss, 96) if captured else None
    metrics = [train_step(model, stage, packs(seed), optimizer, scheduler, cfg, CPU,
                          captured=forwards) for seed in range(rounds)]
    return metrics, model.state_dict(), forwards


def test_replayed_steps_give_the_eager_steps_metrics_and_weights(base_dir, train_file, tmp_path):
    cfg = sft_config(base_dir, train_file, tmp_path, optim={"lr": 1e-2})
    want_metrics, want_weights, _ = steps(base_dir, cfg, captured=False)
    got_metrics, got_weights, forwards = steps(base_dir, cfg, captured=True)
    assert sorted(forwards.buckets) == [8, 16]  # two graphs, one gradient buffer
    assert all(b.grads is forwards.grads for b in forwards.buckets.values())
    for got, want in zip(got_metrics, want_metrics):
        for name in ("loss", "perplexity", "grad_norm"):
            assert got[name] == pytest.approx(want[name], rel=1e-5), name
        assert got["target_tokens"] == want["target_tokens"] and not got.get("skipped")
    # Adam divides by the gradients' root mean square: where that is near 0, rounding differences
    # of the sums' order move a weight by a small share of the step size (lr 1e-2).
    for name, want in want_weights.items():
        torch.testing.assert_close(got_weights[name], want, atol=1e-4, rtol=1e-5)


def test_a_graph_that_weighed_the_prompt_rows_would_move_the_loss(base_dir, train_file, tmp_path):
    """The check above can fail: columns that give every row a weight change the loss."""
    cfg = sft_config(base_dir, train_file, tmp_path)
    want, _, _ = steps(base_dir, cfg, captured=False, rounds=1)

    def every_row(batch, step_counts):
        values = SFT_CAPTURED.values(batch, step_counts)
        return {**values, "weight": torch.full_like(values["weight"], values["weight"].max())}
    got, _, _ = steps(base_dir, cfg, captured=True, rounds=1,
                      loss=dataclasses.replace(SFT_CAPTURED, values=every_row))
    assert got[0]["loss"] != pytest.approx(want[0]["loss"], rel=1e-3)


def rankings(seed=0):
    """Three forwards of one step: pairs; a 3-way ranking beside a pair (an empty prompt); and a
    5-way ranking of one-token answers under an empty prompt (10 pairs in 5 rows: the eager loss)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, 200, (n,), generator=g).tolist()
    return [collate_rm([TokenizedExample(ids(4), (ids(3), ids(2))) for _ in range(3)]),
            collate_rm([TokenizedExample(ids(3), (ids(2), ids(4), ids(1))),
                        TokenizedExample([], (ids(3), ids(3)))]),
            collate_rm([TokenizedExample([], tuple(ids(1) for _ in range(5)))])]


def no_lm_targets(seed=0):
    """A step of pairs of one-token answers under empty prompts: no best response has an LM target
    (the step's counts have no lm_tokens at all)."""
    g = torch.Generator().manual_seed(seed)
    one = lambda: torch.randint(3, 200, (1,), generator=g).tolist()  # noqa: E731
    return [collate_rm([TokenizedExample([], (one(), one())) for _ in range(2)])]


@pytest.fixture
def untied_dir(model_dirs):
    return model_dirs["llama2"][0]


@pytest.mark.parametrize("arch, beta_rm", [("tied", 0.0), ("tied", 0.5), ("untied", 0.0),
                                           ("untied", 0.5)])
def test_reward_model_steps_replayed_give_the_eager_steps(base_dir, untied_dir, train_file, tmp_path,
                                                          arch, beta_rm):
    """Metrics and weights of three steps (K-way rankings beside pairs, a pack of more pairs than
    rows taking the eager loss, a step without LM targets), with weight decay: an untied LM head
    that the loss never reaches (beta_rm 0) keeps no gradient, as in the eager step."""
    model_dir = base_dir if arch == "tied" else untied_dir
    cfg = rm_config(model_dir, train_file, tmp_path, beta_rm=beta_rm,
                    optim={"lr": 1e-2, "weight_decay": 0.1})
    stage = rm_stage(cfg, "float32", CPU)
    results = []
    for captured in (False, True):
        torch.manual_seed(0)
        model = reward_model_from_lm(load_model(model_dir))
        torch.nn.init.normal_(model.score.weight, std=0.5)  # margins of both signs
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, 10)
        forwards = CapturedForwards(model, rm_captured(beta_rm), 64) if captured else None
        metrics = [train_step(model, stage, packs, optimizer, scheduler, cfg, CPU,
                              captured=forwards)
                   for packs in (rankings(0), rankings(1), no_lm_targets())]
        results.append((metrics, model, forwards))
    (want, eager, _), (got, replayed, forwards) = results
    assert sorted(forwards.buckets) == [8]  # the 5-way rankings' forwards ran eagerly
    # The first step's equal to rounding; later ones start from weights that rounding moved.
    for step, (g, w) in enumerate(zip(got, want)):
        for name in ("loss", "rank_loss", "accuracy", "grad_norm") + (("lm_nll",) if beta_rm else ()):
            assert g[name] == pytest.approx(w[name], rel=1e-5 if step == 0 else 1e-4,
                                            abs=1e-7), name
    assert [m["pairs"] for m in got] == [m["pairs"] for m in want] == [17, 17, 2]
    assert 0 < want[0]["accuracy"] < 1
    untouched = arch == "untied" and beta_rm == 0
    assert (replayed.lm_head.weight.grad is None) == (eager.lm_head.weight.grad is None) == untouched
    for (name, w), g in zip(eager.state_dict().items(), replayed.state_dict().values()):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5, msg=name)


def test_bucket_sequences():
    assert [bucket_sequences(s, 4096) for s in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert bucket_sequences(5, 6) == 6  # never more sequences than tokens


def test_train_sft_replays_its_forwards_where_nothing_blocks_it(base_dir, train_file, tmp_path,
                                                                monkeypatch):
    """train.cuda_graphs=true through train_sft: the run's forwards take the captured path (here the
    CPU's padded steps, its device check lifted) and the run's metrics are the eager run's."""
    kw = dict(train={"max_steps": 3}, data={"eval_fraction": 0.0, "tokens_per_microbatch": 48},
              optim={"grad_accum_steps": 2})
    eager = train_sft(sft_config(base_dir, train_file, tmp_path / "eager", **kw))
    runs = []
    real = captured_forwards.CapturedForwards.run
    monkeypatch.setattr(supervised, "blocker", lambda *args: None)
    monkeypatch.setattr(captured_forwards.CapturedForwards, "run",
                        lambda self, *a: runs.append(self.tokens) or real(self, *a))
    kw["train"]["cuda_graphs"] = True
    replayed = train_sft(sft_config(base_dir, train_file, tmp_path / "graphs", **kw))
    assert runs and set(runs) == {48}
    want, got = ([r for r in read_metrics(run.parent) if r["kind"] == "train"]
                 for run in (eager, replayed))
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in want], rel=1e-5)
    a, b = load_model(eager).state_dict(), load_model(replayed).state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-4, rtol=1e-5)


def test_a_run_that_cannot_replay_is_refused_in_one_line(base_dir, train_file, tmp_path):
    cfg = sft_config(base_dir, train_file, tmp_path, train={"cuda_graphs": True})
    with pytest.raises(UsageError, match=r"^train.cuda_graphs=true: not supported here: it needs "
                                         r"CUDA \(the run's device is cpu\); set "
                                         r"train.cuda_graphs=false$"):
        train_sft(cfg)
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("case, message", [
    ("stage", "this stage's loss has no captured form yet"),
    ("ranks", "it runs in one process (this one is 1 of 2)"),
    ("checkpointing", "train.gradient_checkpointing recomputes"),
    ("lora", "LoRA adapters are not shown in a graph yet"),
    ("moe", "an MoE layer reads its routing on the host"),
    ("attention", "packed attention runs"),
])
def test_blocker_names_what_a_run_misses(base_dir, train_file, tmp_path, monkeypatch, case,
                                         message):
    model = load_model(save_moe_base(tmp_path) if case == "moe" else base_dir)
    if case == "ranks":
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
    captured = None if case == "stage" else SFT_CAPTURED
    why = blocker(model, torch.device("cuda"), captured, case == "checkpointing",
                  object() if case == "lora" else None)
    assert why.startswith(message) and "\n" not in why
    assert blocker(model, CPU, SFT_CAPTURED, False, None).startswith("it needs CUDA")


@pytest.mark.gpu
@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_cuda_graphs_train_as_the_eager_run_on_a_gpu(tmp_path, train_file, monkeypatch, stage):
    """On CUDA (bf16-mixed, head size 64: torch's or flash-attn's varlen kernel): train.cuda_graphs
    captures its buckets and replays them, each step's loss within bf16's rounding of the eager
    run's, and the exported weights near the eager run's; SFT's and the reward model's."""
    base = save_tiny_model(tmp_path / "base", "qwen2", hidden_size=128, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=256)
    kw = dict(data={"eval_fraction": 0.0, "tokens_per_microbatch": 48},
              optim={"grad_accum_steps": 2, "lr": 1e-3})
    replayed = []
    real = captured_forwards.CapturedForwards.run

    def run(self, *args):
        out = real(self, *args)
        replayed.extend(b.graph is not None for b in self.buckets.values())
        return out
    monkeypatch.setattr(captured_forwards.CapturedForwards, "run", run)
    if stage == "rm":
        data = write_jsonl(tmp_path / "prefs.jsonl", sorted_digit_preferences(16))
        kw["data"]["tokens_per_microbatch"] = 96
        finals = [train_rm(rm_config(base, data, tmp_path / str(graphs), beta_rm=0.5,
                                     train={"max_steps": 4, "device": "cuda",
                                            "cuda_graphs": graphs}, **kw))
                  for graphs in (False, True)]
    else:
        finals = [train_sft(sft_config(base, train_file, tmp_path / str(graphs),
                                       train={"max_steps": 4, "device": "cuda",
                                              "cuda_graphs": graphs}, **kw))
                  for graphs in (False, True)]
    assert replayed and all(replayed)
    want, got = ([r["loss"] for r in read_metrics(final.parent) if r["kind"] == "train"]
                 for final in finals)
    assert got == pytest.approx(want, rel=0.02)
    # The weights: the two runs apart by less than half of how far the eager run moved them (bf16
    # exports round each weight to 2^-8 of itself; a step of lr 1e-3 moves it about as much).
    start, a, b = (load_model(d, dtype="float32").state_dict() for d in (base, *finals))
    for name in a:
        if a[name].dim() > 1:
            moved = (a[name] - start[name]).norm()
            assert moved > 0 and (b[name] - a[name]).norm() < 0.5 * moved, name

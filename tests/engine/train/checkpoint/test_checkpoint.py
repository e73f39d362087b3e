"""The checkpoint layout on its own (one process): every part comes back exactly, a pickle planted in
a re-sealed checkpoint never runs, a checkpoint
that does not fit the run says what differs before anything is loaded, and the index is checked.
The same layout on two ranks, and across world sizes: test_data_parallel.py, test_lora_data_parallel.py."""
import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from fusedrl.engine.cli import main
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.runs.durable import CorruptDirectory, write_manifest
from fusedrl.engine.errors import FusedRLError, NonFiniteError, one_line
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.lora import add_lora
from fusedrl.engine.model.peft_io import read_adapter_weights
from fusedrl.engine.train import optim
from fusedrl.engine.train.checkpoint import (CheckpointMismatch, SavedModel, Trainables,
                                             checkpoint_dir, list_checkpoints, load_checkpoint, resume,
                                             save_checkpoint)
from fusedrl.engine.train.checkpoint.shards import ShardReader, check_index
from fusedrl.engine.train.runlog import read_metrics
from train_testing import demonstrations, save_tiny_model, write_jsonl

LOOP = {"step": 2, "epoch": 1, "tokens": 96, "kl_coef": 0.05, "moments": {"count": 6, "mean": 0.25, "m2": 1.5}}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ckpt") / "base", "qwen2")  # tied embeddings


class Run:
    """A tiny training setup as a stage builds it: a bf16 model (FusedAdamW keeps fp32 masters) or
    LoRA adapters on it, the warmup + cosine schedule, and a small fp32 module (PPO's value head)."""

    def __init__(self, model_dir, lora_rank=0, dtype=torch.bfloat16):
        self.model = load_model(model_dir, dtype=dtype)
        self.head = nn.Linear(64, 1)
        self.lora = add_lora(self.model, LoRAConfig(rank=lora_rank)) if lora_rank else None
        trained = nn.ModuleList([self.lora or self.model, self.head])
        cfg = OptimConfig(lr=1e-2, warmup_steps=1)
        self.optimizer = optim.build_optimizer(trained, cfg)
        self.scheduler = optim.build_scheduler(self.optimizer, cfg, 10)
        part = ({"model": SavedModel(self.model, lambda d: load_model(d, dtype=dtype))} if self.lora is None
                else {"adapter": SavedModel(self.lora, lambda d: read_adapter_weights(self.lora, d))})
        self.parts = Trainables(part, [self.optimizer], [self.scheduler], {"value_head": self.head})

    def train(self, steps=2):
        for _ in range(steps):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            sum(p.float().sin().sum() for p in params).backward()
            optim.clip_and_step([self.optimizer], 1.0)
            optim.advance_schedule(self.scheduler)
            self.optimizer.zero_grad()
        return self

    def snapshot(self):
        """Everything a checkpoint must bring back, as plain values."""
        opt = self.optimizer.state_dict()
        return ({k: v.clone() for k, v in self.parts.models[next(iter(self.parts.models))].module.state_dict().items()},
                {k: v.clone() for k, v in self.head.state_dict().items()},
                {i: {k: v.clone() for k, v in s.items()} for i, s in opt["state"].items()},
                opt["param_groups"], self.scheduler.state_dict())


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_every_part_comes_back_exactly_from_data_files_only(base_dir, tmp_path):
    run = Run(base_dir).train()
    path = save_checkpoint(tmp_path, 2, run.parts, LOOP)
    assert {p.name for p in path.iterdir()} == {"rank-00000.safetensors", "checkpoint.json", "manifest.json"}
    python_draw, torch_draw = random.random(), torch.rand(3)  # what the saved RNG states draw next
    fresh = Run(base_dir)
    found, loop = resume(tmp_path, fresh.parts)
    assert found == path and loop == LOOP
    assert random.random() == python_draw and torch.equal(torch.rand(3), torch_draw)
    assert_same(fresh.snapshot(), run.snapshot())
    masters = [s["master"] for s in fresh.optimizer.state.values() if "master" in s]
    assert masters and all(m.dtype == torch.float32 for m in masters)  # fp32, not rounded to the bf16 weights


class Payload:
    """Unpickling this creates the file `marker`: what a planted pickle could do, and worse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def plant(path: Path, where: str, marker: Path) -> None:
    """A pickle payload planted in checkpoint `path`, which is then re-sealed (its manifest says
    the files are complete, not who wrote them): in place of its index, or beside it."""
    if where == "instead of the index":
        (path / "checkpoint.json").write_bytes(pickle.dumps(Payload(marker)))
    else:  # beside a current checkpoint, where nothing reads it
        torch.save({"optimizers": [Payload(marker)]}, path / "trainer_state.pt")
    (path / "manifest.json").unlink()
    write_manifest(path)


@pytest.mark.parametrize("where", ["instead of the index", "beside the index"])
def test_a_planted_pickle_never_runs(base_dir, tmp_path, where):
    run = Run(base_dir).train()
    path = save_checkpoint(tmp_path, 2, run.parts, LOOP)
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()  # the payload does run when unpickled
    marker = tmp_path / "pwned"
    plant(path, where, marker)
    fresh = Run(base_dir)
    if where == "beside the index":
        assert resume(tmp_path, fresh.parts)[1] == LOOP
    else:  # not JSON: set aside as corrupt, never unpickled (and, the only one, not restarted from 0)
        before = fresh.snapshot()
        with pytest.raises(FusedRLError, match=f"no checkpoint of {tmp_path} verifies"):
            resume(tmp_path, fresh.parts)
        assert_same(fresh.snapshot(), before)
        assert list_checkpoints(tmp_path) == [] and (tmp_path / "checkpoints" / f"corrupt-{path.name}").is_dir()
    assert not marker.exists()


def corrupt_weights(checkpoint):
    """One flipped byte in the checkpoint's tensors: same size, wrong (its manifest says so)."""
    weights = checkpoint / "rank-00000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_when_no_checkpoint_verifies_the_resume_is_refused_not_restarted_from_step_0(base_dir, tmp_path, capsys):
    run = Run(base_dir).train()
    for step in (1, 2):
        corrupt_weights(save_checkpoint(tmp_path, step, run.parts, {**LOOP, "step": step}))
    refusal = (f"no checkpoint of {tmp_path} verifies: every one is corrupt and set aside in {tmp_path / 'checkpoints'} "
               "(corrupt-step-00000001, corrupt-step-00000002); the run is not restarted from step 0 on its own: "
               "rerun with train.overwrite=true to start it again (its checkpoints and metrics deleted)")
    with pytest.raises(FusedRLError) as refused:
        resume(tmp_path, Run(base_dir).parts)
    assert str(refused.value) == refusal
    err = capsys.readouterr().err
    assert "checkpoint step-00000002 is corrupt" in err and "checkpoint step-00000001 is corrupt" in err
    # Asked again, with only the checkpoints set aside left: the same refusal, not a fresh start.
    with pytest.raises(FusedRLError) as again:
        resume(tmp_path, Run(base_dir).parts)
    assert str(again.value) == refusal
    assert resume(tmp_path / "new", Run(base_dir).parts) == (None, {})  # a run with no checkpoint starts at 0


def test_fusedrl_sft_whose_every_checkpoint_is_corrupt_stops_in_one_line_and_keeps_its_metrics(
        base_dir, tmp_path, capsys):
    args = sft_command(base_dir, tmp_path)
    assert main(args) == 0
    run = tmp_path / "run"
    for step in (1, 2):
        corrupt_weights(checkpoint_dir(run, step))
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main([*args, "train.max_steps=3"]) == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith(f"fusedrl sft: no checkpoint of {run} verifies") and "train.overwrite=true" in last, err
    assert "corrupt-step-00000001, corrupt-step-00000002" in last
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["corrupt-step-00000001", "corrupt-step-00000002"]
    # The way out the line names: the run starts again.
    assert main([*args, "train.overwrite=true"]) == 0
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2]


def sft_command(base_dir, tmp_path):
    """`fusedrl sft` for 2 steps into tmp_path/run, checkpointing every step."""
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(12))
    return ["sft", f"model={base_dir}", f"output_dir={tmp_path / 'run'}", f"data.train_file={data}",
            "data.max_length=48", "data.max_prompt_length=24", "data.tokens_per_batch=128", "train.save_every=1",
            "train.max_steps=2", "train.progress=false", "train.device=cpu"]


def test_a_planted_pickle_never_runs_on_a_fusedrl_sft_resume(base_dir, tmp_path, capsys):
    args = sft_command(base_dir, tmp_path)
    assert main(args) == 0
    marker = tmp_path / "pwned"
    plant(checkpoint_dir(tmp_path / "run", 2), "instead of the index", marker)
    capsys.readouterr()
    # The same command, one step longer: the planted checkpoint is set aside as corrupt and the run
    # resumes from the one before it (a run already complete would change nothing).
    assert main([*args, "train.max_steps=3"]) == 0
    assert "checkpoint step-00000002 is corrupt" in capsys.readouterr().err
    assert [r["resumed_from"] for r in read_metrics(tmp_path / "run")
            if "resumed_from" in r][-1].endswith("step-00000001")
    assert not marker.exists()


def test_fusedrl_sft_resuming_with_another_lora_rank_says_so_and_touches_nothing(base_dir, tmp_path, capsys):
    args = sft_command(base_dir, tmp_path)
    assert main([*args, "lora.rank=4"]) == 0
    run = tmp_path / "run"
    files = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main([*args, "lora.rank=8", "train.max_steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # What differs, both values: the checkpoint's adapters (or the changed option, where the saved
    # config is compared first).
    assert len(err) == 1 and ("[4, 64] there, [8, 64] here" in err[0] or "lora.rank" in err[0]), err
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == files


@pytest.mark.parametrize("change, expected", [
    ({"model": {"hidden_size": 32}}, "has shape [300, 64] there, [300, 32] here"),
    ({"model": {"num_hidden_layers": 1}}, "it holds tensor models.model.model.layers.1."),
    ({"lora_rank": 8, "saved_lora_rank": 4}, "has shape [4, 64] there, [8, 64] here"),
    ({"lora_rank": 4}, "it holds the models ['model'], this run ['adapter']"),
    ({"dtype": torch.float32}, "is bfloat16 there, float32 here"),
])
def test_a_checkpoint_that_does_not_fit_says_what_differs_and_loads_nothing(base_dir, tmp_path, change, expected):
    saved = Run(base_dir, change.get("saved_lora_rank", 0)).train()
    path = save_checkpoint(tmp_path, 2, saved.parts, LOOP)
    other = save_tiny_model(tmp_path / "other", "qwen2", **change["model"]) if "model" in change else base_dir
    run = Run(other, change.get("lora_rank", 0), change.get("dtype", torch.bfloat16))
    before, draw_state = run.snapshot(), torch.get_rng_state()
    with pytest.raises(CheckpointMismatch) as refused:
        load_checkpoint(path, run.parts)
    code, message = one_line(refused.value)
    assert code == 2 and expected in message and str(path) in message and "\n" not in str(refused.value)
    assert_same(run.snapshot(), before)                                      # nothing was loaded
    assert not run.optimizer.state
    assert torch.equal(torch.get_rng_state(), draw_state)


def test_nothing_non_finite_is_written(base_dir, tmp_path):
    run = Run(base_dir).train()
    with pytest.raises(NonFiniteError, match=r"'loop.moments.mean' is nan"):
        save_checkpoint(tmp_path, 2, run.parts, {**LOOP, "moments": {**LOOP["moments"], "mean": float("nan")}})
    with torch.no_grad():
        run.head.weight[0, 3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"'modules.value_head.weight' holds NaN or inf"):
        save_checkpoint(tmp_path, 2, run.parts, LOOP)
    assert list(tmp_path.iterdir()) == []  # not even the checkpoints directory


@pytest.mark.parametrize("chunks, problem", [
    ([{"file": "rank-00000.safetensors", "offsets": [0, 0], "sizes": [2, 3]}], "do not tile"),   # a gap
    ([{"file": "rank-00000.safetensors", "offsets": [0, 0], "sizes": [4, 3]},
      {"file": "rank-00001.safetensors", "offsets": [2, 0], "sizes": [2, 3]}], "do not tile"),   # an overlap
    ([{"file": "../../elsewhere.safetensors", "offsets": [0, 0], "sizes": [4, 3]}], "chunk"),     # outside
    ([{"file": "rank-00000.safetensors", "offsets": [2, 0], "sizes": [4, 3]}], "chunk"),          # past the end
])
def test_an_index_whose_chunks_do_not_tile_their_tensor_is_corrupt(tmp_path, chunks, problem):
    index = {"w": {"dtype": "float32", "shape": [4, 3], "chunks": chunks}}
    with pytest.raises(CorruptDirectory, match=problem):
        check_index(index, tmp_path)
    check_index({"w": {"dtype": "float32", "shape": [4, 3], "chunks": [
        {"file": "rank-00000.safetensors", "offsets": [0, 0], "sizes": [2, 3]},
        {"file": "rank-00001.safetensors", "offsets": [2, 0], "sizes": [2, 3]}]}}, tmp_path)


def test_chunks_that_overlap_where_they_are_read_are_corrupt(tmp_path):
    # The sizes add up (rows 0-1 and 1-2: a row twice, row 3 missing), so only the read can tell.
    index = {"w": {"dtype": "float32", "shape": [4, 3], "chunks": [
        {"file": "rank-00000.safetensors", "offsets": [0, 0], "sizes": [2, 3]},
        {"file": "rank-00001.safetensors", "offsets": [1, 0], "sizes": [2, 3]}]}}
    reader = ShardReader(tmp_path, index)
    with pytest.raises(CorruptDirectory, match="do not tile"):
        reader.read("w", [0, 0], [4, 3])


def test_a_checkpoint_json_of_another_kind_is_corrupt_and_set_aside(base_dir, tmp_path, capsys):
    run = Run(base_dir).train()
    first = save_checkpoint(tmp_path, 1, run.parts, {**LOOP, "step": 1})
    second = save_checkpoint(tmp_path, 2, run.parts, LOOP)
    (second / "checkpoint.json").write_text(json.dumps([1, 2]))
    (second / "manifest.json").unlink()
    write_manifest(second)
    assert resume(tmp_path, Run(base_dir).parts) == (first, {**LOOP, "step": 1})
    assert "checkpoint step-00000002 is corrupt" in capsys.readouterr().err

"""The checkpoint layout on its own (one process): every part comes back exactly, checkpoints of the
earlier layout still resume, a pickle planted in a re-sealed checkpoint never runs, a checkpoint
that does not fit the run says what differs before anything is loaded, and the index is checked.
The same layout on two ranks, and across world sizes: test_data_parallel.py, test_lora_data_parallel.py."""
import json
import pickle
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from fusedrl.engine.cli import main
from fusedrl.engine.config.lora import LoRAConfig
from fusedrl.engine.config.train import OptimConfig
from fusedrl.engine.durable import CorruptDirectory, write_manifest
from fusedrl.engine.errors import NonFiniteError, one_line
from fusedrl.engine.model.hf_io import load_model, save_model
from fusedrl.engine.model.lora import LoRA, add_lora
from fusedrl.engine.model.peft_io import read_adapter_weights, save_adapter
from fusedrl.engine.run_dir import MARKER
from fusedrl.engine.stages.sft import run_sft
from fusedrl.engine.train import optim
from fusedrl.engine.train.checkpoint import (CheckpointMismatch, SavedModel, Trainables, UnsafeCheckpoint,
                                             checkpoint_dir, list_checkpoints, load_checkpoint, resume,
                                             save_checkpoint)
from fusedrl.engine.train.checkpoint.shards import ShardReader, check_index
from fusedrl.engine.train.runlog import read_metrics
from train_testing import demonstrations, save_tiny_model, sft_config, write_jsonl

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


def write_earlier_layout(parts: Trainables, path: Path, loop: dict) -> None:
    """A checkpoint as the one-process layout of earlier versions wrote it: each model its own Hugging
    Face (or PEFT) directory, torch.save of the rest in trainer_state.pt, then the manifest."""
    path.mkdir(parents=True)
    for name, part in parts.models.items():
        (save_adapter if isinstance(part.module, LoRA) else save_model)(part.module, path / name)
    torch.save({"optimizers": [o.state_dict() for o in parts.optimizers],
                "schedulers": [s.state_dict() for s in parts.schedulers],
                "small_modules": {name: m.state_dict() for name, m in parts.small_modules.items()},
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}, "state": loop},
               path / "trainer_state.pt")
    write_manifest(path)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_checkpoint_of_the_earlier_layout_resumes(base_dir, tmp_path, lora_rank):
    run = Run(base_dir, lora_rank).train()
    write_earlier_layout(run.parts, checkpoint_dir(tmp_path, 2), LOOP)
    draw = torch.rand(3)
    fresh = Run(base_dir, lora_rank)
    found, loop = resume(tmp_path, fresh.parts)
    assert found == checkpoint_dir(tmp_path, 2) and loop == LOOP
    assert_same(fresh.snapshot(), run.snapshot())
    assert torch.equal(torch.rand(3), draw)
    # Both continue alike, and the next save is in the current layout.
    assert_same(fresh.train(1).snapshot(), run.train(1).snapshot())
    assert (save_checkpoint(tmp_path, 3, fresh.parts, {**LOOP, "step": 3}) / "checkpoint.json").is_file()


def test_an_sft_run_resumes_from_the_earlier_layout_as_from_its_own(base_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(24))
    kw = dict(optim={"grad_accum_steps": 2, "warmup_steps": 1}, data={"eval_fraction": 0.0})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_sft(sft_config(base_dir, data, straight, train={"max_steps": 2, "save_every": 1, "keep_checkpoints": 0}, **kw))
    # Its step-1 checkpoint rewritten in the earlier layout, through the parts the SFT stage builds.
    cfg = sft_config(base_dir, data, resumed, **kw)
    model = load_model(base_dir)
    optimizer = optim.build_optimizer(model, cfg.optim)
    parts = Trainables({"model": SavedModel(model, load_model)}, [optimizer],
                       [optim.build_scheduler(optimizer, cfg.optim, 2)])
    loop = load_checkpoint(checkpoint_dir(straight, 1), parts)
    write_earlier_layout(parts, checkpoint_dir(resumed, 1), loop)
    shutil.copy2(straight / MARKER, resumed / MARKER)  # the run's own directory, moved as a user would
    run_sft(sft_config(base_dir, data, resumed, train={"max_steps": 2}, **kw))
    assert [r["resumed_from"] for r in read_metrics(resumed) if "resumed_from" in r][0].endswith("step-00000001")
    a, b = load_model(straight / "final").state_dict(), load_model(resumed / "final").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class Payload:
    """Unpickling this creates the file `marker`: what a planted pickle could do, and worse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (Path(self.marker),)


def plant(path: Path, layout: str, marker: Path) -> None:
    """A pickle payload planted in checkpoint `path`, which is then re-sealed (its manifest says
    the files are complete, not who wrote them)."""
    if layout == "earlier":
        (path / "checkpoint.json").unlink()
        torch.save({"optimizers": [Payload(marker)]}, path / "trainer_state.pt")
    elif layout == "earlier multi-rank":
        (path / "checkpoint.json").unlink()
        (path / "sharded").mkdir()
        (path / "sharded" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    else:  # beside a current checkpoint, where nothing reads it
        torch.save({"optimizers": [Payload(marker)]}, path / "trainer_state.pt")
    (path / "manifest.json").unlink()
    write_manifest(path)


@pytest.mark.parametrize("layout", ["earlier", "earlier multi-rank", "current"])
def test_a_planted_pickle_never_runs(base_dir, tmp_path, layout):
    run = Run(base_dir).train()
    path = save_checkpoint(tmp_path, 2, run.parts, LOOP)
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(live)))
    assert live.exists()  # the payload does run when unpickled
    marker = tmp_path / "pwned"
    plant(path, layout, marker)
    fresh = Run(base_dir)
    if layout == "current":
        assert resume(tmp_path, fresh.parts)[1] == LOOP
    else:
        before = fresh.snapshot()
        with pytest.raises(UnsafeCheckpoint) as refused:
            resume(tmp_path, fresh.parts)
        code, message = one_line(refused.value)
        assert code == 2 and "not loaded" in message and "\n" not in str(refused.value)
        assert_same(fresh.snapshot(), before)
        assert list_checkpoints(tmp_path) == [path]  # refused, not set aside as corrupt
    assert not marker.exists()


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
    plant(checkpoint_dir(tmp_path / "run", 2), "earlier", marker)
    capsys.readouterr()
    # The same command, one step longer: it resumes from the newest checkpoint (a run already
    # complete would change nothing).
    assert main([*args, "train.max_steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer_state.pt holds more than tensors and plain data" in err[0]
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

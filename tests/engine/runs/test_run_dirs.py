"""The directories fusedrl writes (engine/runs/run_dir.py): nothing it did not make is written into or
deleted, `.`, home and the inputs are never replaced, an earlier output is continued or replaced
only when asked, one run holds a directory at a time (real processes: a second run is refused at
once naming the holder's pid; a SIGKILLed holder leaves a lock the next run takes), and writes
are whole, sealed, never through a symbolic link, and never run a model directory's own code."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusedrl.engine import cli
from fusedrl.engine.runs import run_dir
from fusedrl.engine.runs.durable import CorruptDirectory, open_append, remove_leftovers, verify_manifest, write_text_atomic
from fusedrl.engine.errors import ModelError, UsageError
from fusedrl.engine.model import hf_io
from fusedrl.engine.model.hf_io import INDEX_FILE, load_model
from fusedrl.engine.train.runlog import read_metrics
from cli_testing import assert_one_line_error, cli_error, run_fusedrl
from dist_testing import run_ranks
from train_testing import demonstrations, save_tiny_model, sft, sft_config, write_jsonl


@pytest.fixture
def base_dir(qwen2_dir):
    return qwen2_dir


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", demonstrations(16))


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    # The ops on their torch backend, here and in child processes: only the directories matter here.
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")


def listing(directory):
    """Every path under `directory` with its contents (files) or None (directories)."""
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(directory.rglob("*"))}


def users_directory(path):
    """A directory that looks like a run but that fusedrl did not make."""
    (path / "final").mkdir(parents=True)
    (path / "final" / "mine.txt").write_text("user data")
    (path / "metrics.jsonl").write_text("my own metrics\n")
    (path / ".notes.tmp-1").write_text("a hidden file named like a temporary")
    return path


def test_a_directory_fusedrl_did_not_make_is_never_written_into_or_deleted(base_dir, train_file, tmp_path, capsys):
    user = users_directory(tmp_path / "user")
    before = listing(user)
    for argv in (sft(base_dir, train_file, user, "train.overwrite=true"),
                 sft(base_dir, train_file, user, "train.resume=false"),
                 ["demo", f"output_dir={user}", "overwrite=true"]):
        code, err = cli_error(argv, capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert f"output_dir={user} exists, is not empty and was not made by fusedrl" in err
    assert listing(user) == before  # not even a lock file


def test_the_current_and_home_directories_and_the_inputs_are_never_replaced(
        base_dir, train_file, tmp_path, monkeypatch, capsys):
    here = tmp_path / "here"
    here.mkdir()
    run_dir.write_marker(here, "demo")  # even a directory fusedrl made, when it is where the user stands
    (here / "results.json").write_text("{}")
    monkeypatch.chdir(here)
    code, err = cli_error(["demo", "output_dir=.", "overwrite=true"], capsys)
    assert (code, err) == (2, "fusedrl demo: output_dir=. is the current directory or holds it: fusedrl never "
                              "replaces it; choose another output_dir\n")
    code, err = cli_error(["demo", f"output_dir={tmp_path}", "overwrite=true"], capsys)
    assert code == 2 and "was not made by fusedrl" in err
    monkeypatch.chdir(tmp_path.parent)
    monkeypatch.setenv("HOME", str(here))
    with pytest.raises(UsageError, match="is the home directory or holds it"):
        run_dir.check_replaceable(tmp_path)
    assert (here / "results.json").exists()
    # A run directory holding its own input (here the data file) is never a run's output.
    data_inside = tmp_path / "run"
    data_inside.mkdir()
    run_dir.write_marker(data_inside, "sft")
    inside = write_jsonl(data_inside / "train.jsonl", demonstrations(4))
    code, err = cli_error(sft(base_dir, inside, data_inside), capsys)
    assert (code, err) == (2, f"fusedrl sft: output_dir={data_inside} is or holds the input {inside}: choose "
                              "another output_dir\n")


@pytest.fixture(scope="module")
def adapter_dir(qwen2_dir, tmp_path_factory):
    """A real PEFT adapter directory (rank-2 LoRA on every projection) of qwen2_dir."""
    import torch

    from fusedrl.engine.config.lora import LoRAConfig
    from fusedrl.engine.model.lora import add_lora
    from fusedrl.engine.model.peft_io import save_adapter

    model = load_model(qwen2_dir)
    lora = add_lora(model, LoRAConfig(rank=2, alpha=4.0))
    with torch.no_grad():
        for _, _, b in lora.named_targets():
            b.normal_(0, 0.1)  # B starts at 0: give the merge something to change
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    save_adapter(lora, out, str(qwen2_dir))
    return out


def test_export_writes_a_marked_sealed_directory_and_replaces_only_an_earlier_export(
        base_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    verify_manifest(adapter_dir)  # the adapters are sealed too
    assert cli.main(["export", str(adapter_dir), "--merge", "--out", str(out)]) == 0
    assert run_dir.read_marker(out)["kind"] == "export"
    verify_manifest(out)
    first = listing(out)
    code, err = cli_error(["export", str(adapter_dir), "--merge", "--out", str(out)], capsys)
    assert (code, err) == (2, f"fusedrl export: --out={out} exists and is not empty; pass --overwrite or another "
                              "--out\n")
    assert cli.main(["export", str(adapter_dir), "--merge", "--out", str(out), "--overwrite"]) == 0
    assert listing(out).keys() == first.keys()
    load_model(out)
    for target, reason in ((adapter_dir, "is or holds the input"), (base_dir, "is or holds the input"),
                           (adapter_dir.parent, "is or holds the input"),
                           (users_directory(tmp_path / "user"), "was not made by fusedrl")):
        before = listing(target)
        code, err = cli_error(["export", str(adapter_dir), "--merge", "--out", str(target), "--overwrite"], capsys)
        assert code == 2 and err.count("\n") == 1 and reason in err, err
        assert listing(target) == before
    (out / "config.json").write_text("{}")
    with pytest.raises(CorruptDirectory):
        verify_manifest(out)


def test_an_earlier_run_is_continued_or_replaced_only_when_asked(base_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(sft(base_dir, train_file, run)) == 0
    assert run_dir.read_marker(run)["kind"] == "sft"
    verify_manifest(run / "final")
    code, err = cli_error(sft(base_dir, train_file, run, "train.resume=false"), capsys)
    assert (code, err) == (2, f"fusedrl sft: output_dir={run} holds an earlier sft run; pass train.resume=true to "
                              "continue it, train.overwrite=true to replace it, or another output_dir\n")
    code, err = cli_error(["rm", f"model={base_dir}", f"output_dir={run}", f"data.train_file={train_file}"], capsys)
    assert (code, err) == (2, f"fusedrl rm: output_dir={run} holds a fusedrl sft run; train.overwrite=true "
                              "replaces only an earlier fusedrl rm run: choose another output_dir\n")
    # Leftovers of killed writes go when a run continues; hidden files merely named like them stay.
    ours, theirs = run / ".final.tmp-abc123", [run / ".notes.tmp-1", run / ".bashrc.old-2", run / "x.tmp-3"]
    for path in (ours, *theirs):
        path.write_text("")
    assert cli.main(sft(base_dir, train_file, run, steps=3)) == 0
    assert not ours.exists() and all(p.exists() for p in theirs)
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2, 3]
    assert cli.main(sft(base_dir, train_file, run, "train.resume=false", "train.overwrite=true")) == 0
    assert not any(p.exists() for p in theirs)  # replaced: the directory was fusedrl's
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]
    assert [r["resumed_from"] for r in read_metrics(run) if "resumed_from" in r] == [None]


def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(
        base_dir, adapter_dir, train_file, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(sft(base_dir, train_file, run)) == 0
    merged = tmp_path / "merged"
    assert cli.main(["export", str(adapter_dir), "--merge", "--out", str(merged)]) == 0
    sft_run, export = listing(run), listing(merged)
    for argv, refusal in (
            (["export", str(adapter_dir), "--merge", "--out", str(run), "--overwrite"],
             f"fusedrl export: --out={run} holds a fusedrl sft run; --overwrite replaces only an earlier "
             "fusedrl export: choose another --out\n"),
            (["rm", f"model={base_dir}", f"output_dir={run}", f"data.train_file={train_file}",
              "train.overwrite=true"],
             f"fusedrl rm: output_dir={run} holds a fusedrl sft run; train.overwrite=true replaces only an "
             "earlier fusedrl rm run: choose another output_dir\n"),
            (["demo", f"output_dir={run}", "overwrite=true"],
             f"fusedrl demo: output_dir={run} holds a fusedrl sft run; overwrite=true replaces only an "
             "earlier fusedrl demo run: choose another output_dir\n"),
            (sft(base_dir, train_file, merged, "train.overwrite=true"),
             f"fusedrl sft: output_dir={merged} holds a fusedrl export; train.overwrite=true replaces only "
             "an earlier fusedrl sft run: choose another output_dir\n")):
        assert cli_error(argv, capsys) == (2, refusal)
        assert listing(run) == sft_run and listing(merged) == export
    # Under the lock too (what a stage and an export call once the command line's check passed).
    for path, kind, option in ((run, "export", "--out"), (merged, "ppo", "output_dir")):
        with pytest.raises(UsageError, match="replaces only an earlier fusedrl"):
            run_dir.claim(path, kind, overwrite=True, option=option)
    assert listing(run) == sft_run and listing(merged) == export


def test_a_directory_holding_only_another_command_s_marker_is_marked_anew(tmp_path):
    # A run killed before it wrote anything leaves its marker and lock: the next command's output
    # carries that command's marker, so that the command may continue or replace it later.
    run_dir.claim(tmp_path / "run", "sft", overwrite=False)
    run_dir.release(tmp_path / "run")
    run_dir.claim(tmp_path / "run", "rm", overwrite=False)
    run_dir.release(tmp_path / "run")
    assert run_dir.read_marker(tmp_path / "run")["kind"] == "rm"


def test_a_failed_start_removes_the_directory_it_made_and_keeps_one_that_was_there(
        base_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')  # no response column: a DataError after the claim
    new, existing = tmp_path / "new" / "run", tmp_path / "existing"
    existing.mkdir()
    for out in (new, existing):
        code, err = cli_error(sft(base_dir, bad, out), capsys)
        assert code == 1 and "bad.jsonl:1" in err, err
    assert not new.exists() and new.parent.is_dir()  # only what the claim made goes
    assert existing.is_dir()

    @run_dir.releases_output_dir
    def writes_then_fails(cfg):
        run_dir.claim(cfg.output_dir, "sft", overwrite=False)
        (Path(cfg.output_dir) / "config.yaml").write_text("written\n")
        raise RuntimeError("later")
    cfg = sft_config(base_dir, bad, tmp_path / "wrote")
    with pytest.raises(RuntimeError):
        writes_then_fails(cfg)
    assert (tmp_path / "wrote" / "config.yaml").is_file()  # an output is never removed


def test_leftover_cleanup_matches_only_the_names_given(tmp_path):
    for name in (".final.tmp-x1", ".final_adapter.old-x2", ".finale.txt.tmp-3", ".notes.tmp-4", "final.tmp-5"):
        (tmp_path / name).mkdir()
    (tmp_path / ".final.tmp-link").symlink_to(tmp_path / "final.tmp-5")
    removed = remove_leftovers(tmp_path, r"final\w*")
    assert sorted(p.name for p in removed) == [".final.tmp-link", ".final.tmp-x1", ".final_adapter.old-x2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".finale.txt.tmp-3", ".notes.tmp-4", "final.tmp-5"]


def test_writes_never_go_through_a_symbolic_link(base_dir, train_file, tmp_path, capsys):
    outside = tmp_path / "precious.yaml"
    outside.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    run_dir.write_marker(run, "sft")
    (run / "config.yaml").symlink_to(outside)
    code, err = cli_error(sft(base_dir, train_file, run), capsys)
    assert (code, err) == (2, f"fusedrl sft: output_dir={run}: config.yaml is a symbolic link to {outside}, outside "
                              "output_dir; fusedrl never writes through it: remove it\n")
    assert outside.read_text() == "keep me"
    # The helpers themselves: a whole-file write replaces the link, an append refuses it.
    write_text_atomic(run / "config.yaml", "new")
    assert not (run / "config.yaml").is_symlink() and outside.read_text() == "keep me"
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(OSError):
        open_append(run / "metrics.jsonl")
    assert outside.read_text() == "keep me"


def test_a_sharded_index_naming_a_file_outside_the_model_directory_is_refused(tmp_path):
    model = save_tiny_model(tmp_path / "model", "qwen2")
    (tmp_path / "elsewhere.safetensors").write_bytes((model / "model.safetensors").read_bytes())
    (model / "model.safetensors").rename(model / "model-00001-of-00001.safetensors")
    from safetensors import safe_open
    with safe_open(str(model / "model-00001-of-00001.safetensors"), "pt") as f:
        names = list(f.keys())
    for file in ("../elsewhere.safetensors", str(tmp_path / "elsewhere.safetensors")):
        (model / INDEX_FILE).write_text(json.dumps({"weight_map": dict.fromkeys(names, file)}))
        with pytest.raises(ModelError, match=re.escape(f"weight_map names '{file}': expected the name of a file")):
            load_model(model)
    (model / INDEX_FILE).write_text(json.dumps({"weight_map": dict.fromkeys(names, "model-00001-of-00001.safetensors")}))
    load_model(model)


def test_a_model_directory_s_own_code_never_runs_even_when_stdin_says_yes(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model", "qwen2")
    auto_map = {"AutoConfig": "custom_code.CustomConfig", "AutoTokenizer": ["custom_code.CustomTokenizer", None]}
    for name, extra in (("config.json", {"model_type": "custom"}), ("tokenizer_config.json",
                                                                    {"tokenizer_class": "CustomTokenizer"})):
        config = json.loads((model / name).read_text())
        (model / name).write_text(json.dumps({**config, **extra, "auto_map": auto_map}))
    ran = tmp_path / "ran"
    (model / "custom_code.py").write_text(
        f"import pathlib\npathlib.Path({str(ran)!r}).write_text('code from the model directory ran')\n"
        "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'custom'\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    # transformers left to itself asks on stdin whether to run the directory's code, and runs it on
    # "y": in a process of its own, so that the directory's code runs there and not in this one.
    subprocess.run([sys.executable, "-c", f"from transformers import AutoTokenizer; "
                    f"AutoTokenizer.from_pretrained({str(model)!r})"],
                   input="y\n", capture_output=True, text=True, timeout=120)
    assert ran.exists()
    ran.unlink()
    # Our loaders, here with the same "y" waiting on stdin (transformers' prompt reads sys.stdin).
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    with pytest.raises(ModelError, match="cannot be loaded without running code from the directory"):
        hf_io.load_tokenizer(model)
    # a tokenizer that is only broken is said to be so, not to need code
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizerClass"}')
    with pytest.raises(ModelError, match=r"broken: its tokenizer cannot be loaded \(") as caught:
        hf_io.load_tokenizer(broken)
    assert "running code" not in str(caught.value)
    with pytest.raises(ModelError):
        hf_io.load_config(model)
    assert not ran.exists()


HOLD = """import sys, time
from fusedrl.engine.runs import run_dir
run_dir.claim(sys.argv[1], "sft", overwrite=False, resume=True)
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_at_once_naming_the_holder_and_a_killed_holder_frees_the_directory(
        base_dir, train_file, tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        start = time.monotonic()
        result = run_fusedrl(*sft(base_dir, train_file, run))
        elapsed = time.monotonic() - start
        assert_one_line_error(result, 2, f"output_dir={run} is in use by another fusedrl run (pid {holder.pid})")
        # Refused by the command line's check, before torch is imported: a fresh interpreter's start
        # and the config's parsing (well under a second on an idle machine; this one may be shared).
        assert elapsed < 10, elapsed
        assert {p.name for p in run.iterdir()} == {run_dir.LOCK, run_dir.MARKER}
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    # The OS released the dead holder's lock: the next run takes the directory.
    assert cli.main(sft(base_dir, train_file, run)) == 0
    assert (run / run_dir.LOCK).read_text() == f"{os.getpid()}\n"
    run_dir.claim(run, "sft", overwrite=False, resume=True)  # and released it when it ended
    run_dir.release(run)


def test_two_fusedrl_runs_into_one_directory_the_second_is_refused_and_the_first_completes(
        base_dir, train_file, tmp_path, capsys):
    # The first run a real process, the second this one: the lock is between two processes, and
    # the second's refusal (before torch) takes milliseconds, well within the first's steps.
    run, steps = tmp_path / "run", 3
    first = subprocess.Popen([sys.executable, "-m", "fusedrl.engine.cli",
                              *sft(base_dir, train_file, run, "train.save_every=0", steps=steps)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((run / run_dir.LOCK).exists() and (run / run_dir.LOCK).read_text() == f"{first.pid}\n"):
        assert first.poll() is None and time.monotonic() < deadline, "the first run ended before taking its lock"
        time.sleep(0.01)
    second = cli_error(sft(base_dir, train_file, run, "train.resume=false", "train.overwrite=true"), capsys)
    assert first.poll() is None, "the first run ended before the second was refused"
    assert second == (2, f"fusedrl sft: output_dir={run} is in use by another fusedrl run (pid {first.pid}); "
                         "wait for it to end or choose another output_dir\n")
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "train"] == list(range(1, steps + 1))
    verify_manifest(run / "final")


CLAIM_ON_EVERY_RANK = """import os, sys
from fusedrl.engine.config.train import TrainConfig
from fusedrl.engine.parallel import distributed
from fusedrl.engine.train import run_setup
distributed.init_distributed("cpu", 60)
# One os.write per line (atomic on a pipe): print's text and newline can interleave with the other rank's.
try:
    run_setup.claim_output_dir("sft", TrainConfig(), sys.argv[1], [])
    os.write(1, f"rank {distributed.rank()} took it\\n".encode())
except Exception as e:
    os.write(1, f"rank {distributed.rank()} refused: {type(e).__name__}: {e}\\n".encode())
distributed.leave(0)
"""


def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_gets_its_answer(tmp_path):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        script = tmp_path / "claim.py"
        script.write_text(CLAIM_ON_EVERY_RANK)
        result = run_ranks(script, run)
        assert result.returncode == 0, result.stderr[-3000:]
        refusal = (f"UsageError: output_dir={run} is in use by another fusedrl run (pid {holder.pid}); wait for it "
                   "to end or choose another output_dir")
        assert sorted(result.stdout.splitlines()) == [f"rank {r} refused: {refusal}" for r in (0, 1)]
        assert (run / run_dir.LOCK).read_text() == f"{holder.pid}\n"
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()

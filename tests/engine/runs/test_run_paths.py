"""Paths fixed at a run's start and inputs protected (engine/runs/run_paths.py, engine/runs/run_dir.py): a
symbolic link given as output_dir is written where it leads, never through; a reward function that
changes directory moves nothing; nothing the run reads (its --config YAML, its data, its reward
module) is deleted by train.overwrite=true: such a run is refused in one line naming the input, and
the file survives."""
import os

import pytest
import yaml

from fusedrl.engine import cli
from fusedrl.engine.runs import run_dir
from fusedrl.engine.config.ppo import GRPOConfig, LoopConfig
from fusedrl.engine.errors import UsageError
from fusedrl.engine.runs.run_paths import module_file, pinned, run_inputs
from fusedrl.engine.stages.ppo.trainer import train_ppo
from cli_testing import cli_error
from reward_testing import vowel_fraction
from test_run_dirs import listing
from train_testing import demonstrations, sft, write_jsonl


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("FUSEDRL_BACKEND", "torch")


def earlier_run(path, kind="sft"):
    """A directory holding an earlier fusedrl run (marked): train.overwrite=true may replace it."""
    path.mkdir()
    run_dir.write_marker(path, kind)
    (path / "metrics.jsonl").write_text("{}\n")
    return path


def test_a_symlinked_output_dir_is_written_where_it_leads_with_absolute_paths(
        qwen2_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", demonstrations(8))
    (tmp_path / "target").mkdir()
    os.symlink("target", tmp_path / "link")
    assert cli.main(sft(qwen2_dir, "train.jsonl", "link", steps=1)) == 0
    assert (tmp_path / "link").is_symlink()  # the link untouched, everything in its target
    assert run_dir.read_marker(tmp_path / "target")["kind"] == "sft"
    saved = yaml.safe_load((tmp_path / "target" / "config.yaml").read_text())
    assert saved["output_dir"] == str(tmp_path / "target")
    assert saved["data"]["train_file"] == str(tmp_path / "train.jsonl")  # no chdir moves it
    # Resumed from elsewhere with the same file named relatively: the same input, not a change.
    monkeypatch.chdir(tmp_path / "target")
    assert cli.main(sft(qwen2_dir, "../train.jsonl", "../link", steps=2)) == 0


def test_pinned_makes_inputs_absolute_and_resolves_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    os.symlink("real", tmp_path / "out")
    cfg = pinned(GRPOConfig(policy="pol", prompts_file="p.jsonl", output_dir="out",
                            reward_fn="rw:score"))
    assert (cfg.policy, cfg.prompts_file, cfg.output_dir) == (
        str(tmp_path / "pol"), str(tmp_path / "p.jsonl"), str(tmp_path / "real"))


def test_a_reward_function_that_changes_directory_moves_nothing(qwen2_dir, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "run" / "final").mkdir(parents=True)
    (elsewhere / "run" / "final" / "mine.txt").write_text("a user's file")
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path / "home")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello world"}])

    def wandering_reward(prompts, responses):
        os.chdir(elsewhere)
        return vowel_fraction(prompts, responses)

    cfg = GRPOConfig(policy=str(qwen2_dir), prompts_file=str(prompts), output_dir="run",
                     train=LoopConfig(iterations=1, progress=False, device="cpu"))
    cfg.rollout.prompts_per_iteration, cfg.rollout.max_new_tokens = 1, 4
    cfg.rollout.kv_cache_memory = 1 << 22
    cfg.reward.isolation = "thread"  # in the trainer's own process: its chdir is the trainer's
    train_ppo(cfg, reward_fn=wandering_reward)
    assert (tmp_path / "home" / "run" / "final" / "config.json").is_file()
    assert sorted(p.name for p in (elsewhere / "run").rglob("*")) == ["final", "mine.txt"]


def test_an_input_inside_output_dir_survives_overwrite(qwen2_dir, tmp_path, monkeypatch, capsys):
    run = earlier_run(tmp_path / "run")
    config = run / "sft.yaml"
    config.write_text(yaml.safe_dump({"model": str(qwen2_dir)}))
    data = write_jsonl(tmp_path / "train.jsonl", demonstrations(4))
    before = listing(run)
    argv = sft(qwen2_dir, data, run, "train.overwrite=true")
    code, err = cli_error(["sft", "--config", str(config), *argv[2:]], capsys)
    assert (code, err) == (2, f"fusedrl sft: output_dir={run} is or holds the input {config}: "
                              "choose another output_dir\n")
    assert listing(run) == before
    # The reward function's module, found where importlib would find it (the current directory).
    monkeypatch.chdir(tmp_path)
    (run / "reward.py").write_text("def score(prompts, responses):\n    return [0.0]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hi"}])
    code, err = cli_error(["grpo", f"policy={qwen2_dir}", f"prompts_file={prompts}",
                           "output_dir=run", "reward_fn=run.reward:score", "train.overwrite=true"],
                          capsys)
    assert (code, err) == (2, f"fusedrl grpo: output_dir=run is or holds the input "
                              f"{run / 'reward.py'}: choose another output_dir\n")
    assert (run / "reward.py").is_file()


def test_the_reward_module_is_found_without_importing_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("raise SystemExit('package code never runs')\n")
    (tmp_path / "pkg" / "rw.py").write_text("")
    assert module_file("pkg.rw:score") == str(tmp_path / "pkg" / "rw.py")
    assert module_file("pkg:score") == str(tmp_path / "pkg" / "__init__.py")
    assert module_file("no_such_module:f") is None and module_file("../x:f") is None
    cfg = GRPOConfig(policy="pol", prompts_file="p.jsonl", output_dir="out",
                     reward_fn="pkg.rw:score")
    assert run_inputs(cfg, "c.yaml") == ["pol", "p.jsonl", str(tmp_path / "pkg" / "rw.py"),
                                         "c.yaml"]


def test_an_out_refusal_never_advises_deleting_what_fusedrl_did_not_make():
    with pytest.raises(UsageError) as refused:
        run_dir.check_target("/usr", "export", overwrite=True, option="--out",
                             overwrite_option="--overwrite")
    assert "was not made by fusedrl" in str(refused.value) and "remove" not in str(refused.value)


def test_the_command_refuses_to_overwrite_its_own_config(qwen2_dir, tmp_path, capsys):
    run = earlier_run(tmp_path / "run")
    config = run / "sft.yaml"
    data = write_jsonl(tmp_path / "t.jsonl", [])
    config.write_text(yaml.safe_dump({"model": str(qwen2_dir), "output_dir": str(run),
                                      "data": {"train_file": str(data)}}))
    code, err = cli_error(["sft", "--config", str(config), "train.overwrite=true"], capsys)
    assert code == 2 and err.count("\n") == 1 and f"is or holds the input {config}" in err, err
    assert config.is_file() and (run / "metrics.jsonl").read_text() == "{}\n"

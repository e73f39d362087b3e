"""`fusedrl bench`: one case of each suite through the command (--quick, only=), the schema of
results.json (every timing with its spread and phases), the rl row's weight sync and plan,
compare's ratios, the options' one-line errors, the device table. Times are reported, never
checked."""
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from fusedrl.bench import devices, results
from fusedrl.engine.cli import main

ROOT = Path(__file__).resolve().parents[2]
TRL_DIR = Path(os.environ.get("FUSEDRL_TRL_DIR", ROOT / ".ci-trl"))
# One case per suite (a small RL op, batch-1 decode, the train step, a GRPO iteration, the headline
# set's MoE decode step), and one of each of the kernels suite's sampler and attention families.
ONE_OF_EACH = ("only=kernels: gae fwd,generate: decode batch 1 (,train: 128 tokens,rl: grpo,"
               "kernels: sampler B=1,kernels: attention,headline: moe")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    assert main(["bench", "all", "--quick", ONE_OF_EACH, f"output_dir={out}"]) == 0
    return out


def test_all_quick_writes_one_schema_with_every_suite_and_its_limit(quick_run):
    payload = json.loads((quick_run / "results.json").read_text())
    meta = payload["meta"]
    if torch.cuda.is_available():  # a GPU's limits are its datasheet's, where bench/devices.py has it
        assert meta["commit"] and meta["device"] == torch.cuda.get_device_name()
    else:
        assert meta["commit"] and meta["device"].startswith("cpu")
        assert meta["limits"]["source"] == "measured" and "CPU" in meta["limits"]["label"]
    assert meta["command"].startswith("fusedrl bench all --quick") and meta["ended"] == "complete"
    assert {"torch", "trl", "transformers"} <= set(meta["versions"]) and meta["time_utc"]
    rows = payload["rows"]
    assert {r["suite"] for r in rows} == set(results.SUITES)
    for row in rows:
        assert "fraction_of_limit" in row and row["limit"], row
        if row["status"] == "ok":
            assert 0 < row["fraction_of_limit"] and row["seconds"] > 0, row
            assert row["seconds_p20"] <= row["seconds"] <= row["seconds_p80"] and row["n"] >= 1
            assert min(row["setup_s"], row["compile_s"], row["measure_s"]) >= 0, row
        else:  # a peer that did not run has no figures
            assert row["fraction_of_limit"] is None and "seconds" not in row, row
    ours = {r["suite"] for r in rows if r["impl"] == "fusedrl" and r["status"] == "ok"}
    assert ours == set(results.SUITES)
    kernels = {(r["name"].split()[0], r["impl"]) for r in rows if r["suite"] == "kernels"}
    assert {("sampler", "fusedrl"), ("sampler", "eager"), ("attention", "fusedrl"),
            ("attention", "loop"), ("attention", "padded groups")} <= kernels, kernels
    # the sampler replayed from a CUDA graph (as the engine's decode step runs it): CUDA only
    graphed = [r for r in rows if r["impl"] == "fusedrl CUDA graph"]
    assert graphed and all((r["status"] == "ok") == torch.cuda.is_available() for r in graphed)
    # the CPU's rows run what the engine runs there (the PyTorch backend), not the interpreter
    assert torch.cuda.is_available() or (meta["backend"] == "torch"
                                         and not meta["triton_interpreter"])
    assert not any("interpreter" in r["impl"] for r in rows)
    # which kernel a packed batch's attention ran, named once (on a GPU a varlen kernel, never the
    # padded SDPA groups)
    assert (meta["attention"] != "padded SDPA") == torch.cuda.is_available(), meta["attention"]
    streamed = [json.loads(line) for line in (quick_run / "results.jsonl").read_text().splitlines()]
    assert [(r["suite"], r["name"], r["impl"]) for r in streamed] == \
        [(r["suite"], r["name"], r["impl"]) for r in rows]
    assert (quick_run / "results.md").read_text().count("## ") == 5
    assert (quick_run / "fraction_of_limit.png").stat().st_size > 0
    assert (quick_run / "phases.png").stat().st_size > 0


def test_rl_row_measures_the_weight_sync_and_sits_beside_the_plan(quick_run):
    rows = json.loads((quick_run / "results.json").read_text())["rows"]
    grpo = next(r for r in rows if r["suite"] == "rl" and r["impl"] == "fusedrl")
    # The one-copy actor: the generator reads the policy's storage, and the sync is timed.
    assert grpo["weight_copies"] == 0 and 0 <= grpo["weight_sync_s"] < grpo["seconds"]
    # the allocator's peak on a GPU, the process's resident peak on the CPU
    assert grpo["plan_peak_gib"] > 0 and grpo.get("peak_gib", grpo.get("process_peak_rss_gib")) > 0
    # the KV pool on both sides of the comparison: the one the actor allocated, the plan's
    assert 0 < grpo["kv_pool_gib"] <= grpo["plan_kv_pool_gib"] < grpo["plan_peak_gib"], grpo
    assert grpo["response_tokens"] == 2 * 4 * 16 and grpo["tokens_per_s_per_gpu"] > 0
    phases = sum(grpo[f"time_{p}"] for p in ("generate", "score", "reference", "old", "train"))
    assert phases <= grpo["seconds"]
    peer = next(r for r in rows if r["suite"] == "rl" and r["impl"] != "fusedrl")
    assert peer["impl"].startswith("trl")


def test_the_transformers_decode_peer_names_its_fair_settings_and_its_capped_tokens(quick_run):
    rows = json.loads((quick_run / "results.json").read_text())["rows"]
    hf = next(r for r in rows if r["suite"] == "generate" and r["impl"].startswith("transformers"))
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    assert hf["impl"].endswith(f"(sdpa, {dtype}, KV cache on; {hf['new_tokens']} new)"), hf
    assert hf["status"] == "ok" and hf["forward_ms"] > 0 and hf["new_tokens"] <= 64, hf


def test_compare_prints_each_shared_figure_as_a_ratio(quick_run, tmp_path, capsys):
    a = json.loads((quick_run / "results.json").read_text())
    b = copy.deepcopy(a)
    for row in b["rows"]:
        if row["status"] == "ok":
            row["seconds"] *= 2
    (tmp_path / "b.json").write_text(json.dumps(b))
    capsys.readouterr()
    assert main(["bench", "compare", str(quick_run / "results.json"), str(tmp_path / "b.json")]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    ratios = [line[-1] for line in lines if "seconds" in line]
    assert ratios and all(r == "2" for r in ratios), ratios
    assert main(["bench", "compare", str(quick_run / "results.md"), str(tmp_path / "b.json")]) == 2


def test_bad_options_are_one_line_errors(tmp_path, capsys, monkeypatch):
    (tmp_path / "results.json").write_text("{}")
    for argv, expected in (
            (["kernels", "speed=fast"], "'speed=fast': expected key=value with key one of"),
            (["rl", "model=gpt-9"], "model=gpt-9: expected one of qwen2.5-0.5b"),
            (["train", "seed=x"], "seed=x: expected an integer"),
            (["all", f"output_dir={tmp_path}"], "was not made by fusedrl")):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fusedrl bench: ") and expected in err and "\n" not in err, err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun only train and rl run, on every rank
    for suite in ("all", "generate"):
        assert main(["bench", suite, "--quick"]) == 2
        err = capsys.readouterr().err.strip()
        named = "headline" if suite == "all" else suite
        assert f"fusedrl bench {named} under torchrun (WORLD_SIZE=2): expected one of train, " \
            "rl" in err and "\n" not in err, err


def _listing(directory):
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None
            for p in sorted(directory.rglob("*"))}


def test_output_dir_is_never_one_fusedrl_did_not_make_and_an_earlier_run_goes_only_when_asked(
        tmp_path, capsys, monkeypatch):
    """output_dir follows every fusedrl command's rules (engine/runs/run_dir.py): a directory
    fusedrl did not make, or another command's output, is refused in one line whatever overwrite
    says and left as it was; an earlier bench run is replaced only with overwrite=true."""
    monkeypatch.setattr(devices, "device_limits",
                        lambda device: devices.Limits("CPU (test)", 1e11, 1e10, "measured"))
    one_case = ["headline", "--quick", "only=kl_penalty fwd 256"]
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "results.md").write_text("my notes\n")
    (notes / "results.jsonl").write_text('{"mine": 1}\n')
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.json").write_text('{"mine": 1}')
    sft_run = tmp_path / "sft_run"
    sft_run.mkdir()
    (sft_run / ".fusedrl-run").write_text('{"kind": "sft", "created": "2026-01-01T00:00:00Z"}\n')
    (sft_run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\n')
    for target, expected in ((notes, "exists, is not empty and was not made by fusedrl"),
                             (mine, "exists, is not empty and was not made by fusedrl"),
                             (sft_run, "holds a fusedrl sft run; overwrite=true replaces only an "
                                       "earlier fusedrl bench run: choose another output_dir")):
        before = _listing(target)
        for extra in ([], ["overwrite=true"]):
            assert main(["bench", *one_case, f"output_dir={target}", *extra]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith(
                f"fusedrl bench: output_dir={target} ") and expected in err, err
            assert _listing(target) == before
    out = tmp_path / "run"
    assert main(["bench", *one_case, f"output_dir={out}"]) == 0
    assert json.loads((out / ".fusedrl-run").read_text())["kind"] == "bench"
    first = json.loads((out / "results.json").read_text())
    assert main(["bench", *one_case, f"output_dir={out}"]) == 2
    assert capsys.readouterr().err == (f"fusedrl bench: output_dir={out} exists and is not empty; "
                                       "pass overwrite=true or another output_dir\n")
    assert json.loads((out / "results.json").read_text()) == first
    (out / "stale.png").write_bytes(b"")  # an earlier run's file: replaced with the run
    assert main(["bench", *one_case, f"output_dir={out}", "overwrite=true"]) == 0
    assert not (out / "stale.png").exists()
    second = json.loads((out / "results.json").read_text())
    assert second["meta"]["command"].endswith("overwrite=true") and len(second["rows"]) == len(
        (out / "results.jsonl").read_text().splitlines())


def test_the_device_table_names_each_datacenter_gpu_and_nothing_else():
    assert devices.datasheet_limits("NVIDIA H100 80GB HBM3").label == "H100 SXM (datasheet)"
    assert devices.datasheet_limits("NVIDIA H200").bytes_per_s == 4.8e12
    assert devices.datasheet_limits("NVIDIA A100-SXM4-40GB").bytes_per_s == 1.555e12
    assert devices.datasheet_limits("NVIDIA A100-SXM4-80GB").bytes_per_s == 2.039e12
    assert devices.datasheet_limits("NVIDIA B200").flops_per_s == 2.25e15
    assert devices.datasheet_limits("NVIDIA GeForce RTX 4090") is None


def test_a_cpu_limit_measured_under_load_says_so(monkeypatch):
    """The machine's other work lowers a measured CPU limit whatever the estimator: its load is
    recorded beside the limit, and a load past the cores named in the limit's label."""
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(devices, "RUNS", 1)
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    limits = devices.measured_limits(torch.device("cpu"))
    assert limits.spread["load_average"] == cores + 3.0 and limits.spread["cores"] == cores
    assert f"under load: {cores + 3.0:.1f} processes ready on {cores} cores" in limits.label
    monkeypatch.setattr(devices.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    assert "under load" not in devices.measured_limits(torch.device("cpu")).label


@pytest.mark.integration
@pytest.mark.skipif(not (TRL_DIR / "trl").is_dir(), reason=f"TRL 1.x is not installed in {TRL_DIR}")
def test_trl_1x_and_liger_rows_run_beside_ours_where_installed(monkeypatch):
    """TRL 1.x's fused head (the GRPO loss from hidden states) and chunked divergence (the
    distillation divergence), Liger's, ours and eager PyTorch side by side, versions named: the
    kernels suite's two losses, each variant in its own process with TRL_DIR first on its path
    (the suite's own rows, called without the command's limits measurement and charts)."""
    from fusedrl.bench.options import BenchOptions
    from fusedrl.bench.context import Context
    from fusedrl.bench.suites import kernels
    monkeypatch.setenv("PYTHONPATH", str(TRL_DIR))
    monkeypatch.syspath_prepend(str(TRL_DIR))  # the peers' versions, as the command reads them
    limits = devices.Limits("CPU (test)", 1e11, 1e10, "measured")
    ctx = Context(torch.device("cpu"), limits, BenchOptions(quick=True))
    # small shapes: the peers' agreement, not the memory the suite's shapes show
    rows = [*kernels.grpo_loss_rows(ctx), *kernels.distill_rows(ctx, (64, 16, 256))]
    for family, trl_impl in (("grpo_loss", "trl fused head 1."),
                             ("distill_divergence", "trl chunked divergence 1.")):
        mine = [r for r in rows if r["name"].startswith(family)]
        assert {r["impl"].split()[0] for r in mine} == {"eager", "fusedrl", "liger", "trl"}, mine
        assert all(r["status"] == "ok" and r["seconds"] > 0 and r["fraction_of_limit"] > 0
                   for r in mine), mine
        assert next(r for r in mine if r["impl"].startswith(trl_impl))
    grpo_trl = next(r for r in rows if r["impl"].startswith("trl fused head"))
    assert grpo_trl["grad_weight_rel_error"] < 1e-4, grpo_trl
    # every distillation variant's loss is the eager one's (the same divergence of the same inputs)
    distill = [r for r in rows if r["name"].startswith("distill_divergence")]
    eager = next(r["loss"] for r in distill if r["impl"] == "eager")
    assert all(abs(r["loss"] - eager) <= 1e-5 * abs(eager) for r in distill), distill


@pytest.mark.integration
@pytest.mark.skipif(not (TRL_DIR / "trl").is_dir(), reason=f"TRL 1.x is not installed in {TRL_DIR}")
def test_the_ppo_peer_runs_trl_0_29_though_trl_1x_comes_first_on_the_path(monkeypatch):
    """A visit's path holds TRL 1.x first (GRPO's peer, the fused heads) and trl 0.29.1 after it,
    the last with a PPO trainer: the PPO row runs 0.29.1 (in a process with it first on its path),
    the GRPO row 1.x."""
    from fusedrl.bench.options import BenchOptions
    from fusedrl.bench.context import Context
    from fusedrl.bench.suites import rl
    if rl.trl_peer("ppo") is None:
        pytest.skip("no trl with a PPO trainer on the path (the test extra's trl 0.29.1)")
    monkeypatch.setenv("PYTHONPATH", str(TRL_DIR))
    monkeypatch.syspath_prepend(str(TRL_DIR))  # TRL 1.x first, as on a visit's bench path
    import importlib.metadata
    assert importlib.metadata.version("trl").startswith("1.")
    assert rl.trl_peer("ppo").version == "0.29.1" and not rl.trl_peer("ppo").first
    limits = devices.Limits("CPU (test)", 1e11, 1e10, "measured")
    ctx = Context(torch.device("cpu"), limits, BenchOptions(quick=True))
    try:
        row, = rl.peer_rows(ctx, "ppo")
    finally:
        ctx.release(suite_end=True)  # the checkpoints it wrote
    assert row["impl"] == "trl 0.29.1 PPOTrainer" and row["status"] == "ok", row
    assert row["seconds"] > 0 and row["response_tokens"] > 0

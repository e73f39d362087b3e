"""Every `fusedrl bench` case leaves the device as it found it: what a case built (the engine,
its KV pool) is gone before the next case starts unless the next names it in Case.shares, the
device is freed between cases (context.free_device), and a case's budget bounds its timed
repetitions, never its first measurement (a slow setup still gives its row). The two losses'
variants measured in the bench's process (a GPU's way) each get a timed loop, one after another,
a peer that is not installed never imported."""
import gc
import time
import weakref

import torch

from fusedrl.bench import bench_distill, bench_integrations, context, devices, runner, timing
from fusedrl.bench.cases import Case, run_case
from fusedrl.bench.options import BenchOptions
from fusedrl.bench.suites import generate, kernels

FIXED = devices.Limits("CPU (test)", 1e11, 1e10, "measured")


def quick_context() -> context.Context:
    return context.Context(torch.device("cpu"), FIXED, BenchOptions(quick=True))


def run(cases, ctx, options=None):
    rows = []
    clock = runner.Clock(options or ctx.options)
    runner.run_cases(cases, ctx, clock, lambda row, left, case: rows.append(row))
    return rows


def test_the_engine_a_case_built_is_dead_before_a_case_that_does_not_share_it(monkeypatch):
    """The quick decode case's LLM is kept for the mixed case, which names it, and collected
    before the next, which does not; with the cycle a GPU's engine has (its runner and the decode
    graphs that step it point at each other), made here with graphs that replay eagerly."""
    from fusedrl.engine.inference import llm as llm_module
    from fusedrl.engine.inference.decode_graphs import DecodeGraphs
    built = []

    class Recorded(llm_module.LLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.runner.cycle = DecodeGraphs(self.runner, 2, capture=False)
            built.append(weakref.ref(self))
    monkeypatch.setattr(llm_module, "LLM", Recorded)
    seen = []

    def probe():
        seen.append([ref() is None for ref in built])
        yield {"suite": "headline", "name": "probe", "impl": "probe", "status": "ok",
               "fraction_of_limit": None, "limit": "-"}
    ctx = quick_context()
    cases = [generate.decode_case(ctx, 16), generate.mixed_case(ctx),
             Case("headline", "probe", ("probe",), probe)]
    gc.disable()  # as for long-lived objects: only the runner's collection frees the cycle
    try:
        with ctx.scope():
            rows = run(cases, ctx)
    finally:
        gc.enable()
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    assert len(built) == 1 and seen == [[True]]  # built once, shared, then released


def test_the_runner_frees_the_device_after_every_case_and_keeps_only_what_is_named(monkeypatch):
    events = []
    monkeypatch.setattr(context, "free_device", lambda device: events.append("free"))
    ctx = quick_context()

    def case(name, shares=(), reads=None):
        def measure():
            value = ctx.shared(reads, lambda: object(), lambda v: events.append(f"drop {reads}")) \
                if reads else None
            events.append(f"{name} {id(value) if value is not None else ''}".strip())
            yield {"suite": "headline", "name": name, "impl": "x", "status": "ok",
                   "fraction_of_limit": None, "limit": "-"}
        return Case("headline", name, ("x",), measure, shares)
    run([case("a", reads="m"), case("b", ("m",), "m"), case("c")], ctx)
    first, second = events[1].split()[1], events[3].split()[1]
    assert first == second  # b found a's value: named in its shares
    assert [e.split()[0] for e in events] == ["free", "a", "free", "b", "drop", "free", "c",
                                              "free"], events


def test_a_slow_setup_still_gets_its_first_measurement_the_budget_bounds_the_loop():
    def slow():
        time.sleep(0.3)  # setup past the whole budget
        t = timing.measure(lambda: sum(range(1000)), torch.device("cpu"), min_reps=3,
                           budget_s=5.0)
        yield {"suite": "headline", "name": "slow", "impl": "x", "status": "ok",
               "fraction_of_limit": 1.0, "limit": "-", "seconds": t.median_s}
    rows = []
    run_case(Case("headline", "slow", ("x",), slow), 0.1, rows.append)
    assert rows[0]["status"] == "ok" and rows[0]["n"] == 1 and rows[0]["setup_s"] >= 0.3, rows
    rows = []  # without a budget the loop runs to its own
    run_case(Case("headline", "slow", ("x",), slow), None, rows.append)
    assert rows[0]["n"] > 3, rows


def test_a_row_timed_on_its_own_is_measure_not_setup_and_a_first_iteration_is_compile():
    """A row whose seconds no loop holds (one timed run, as a decode or an RL iteration is) gives
    them as measure_s, and setup_s does not count them again; a warm-up timed elsewhere (an RL
    side's first iteration) is compile_s: the three add up to the case's wall time."""
    def own():
        time.sleep(0.1)  # setup
        timing.note_warm_up(0.2)  # a first iteration, timed by the caller
        time.sleep(0.2)
        start = time.perf_counter()
        time.sleep(0.3)  # the measured run
        yield {"suite": "headline", "name": "own", "impl": "x", "status": "ok",
               "fraction_of_limit": 1.0, "limit": "-", "seconds": time.perf_counter() - start}
    rows = []
    begin = time.perf_counter()
    run_case(Case("headline", "own", ("x",), own), None, rows.append)
    wall = time.perf_counter() - begin
    row = rows[0]
    assert row["measure_s"] >= 0.3 and row["compile_s"] == 0.2, row
    assert 0.1 <= row["setup_s"] < 0.2, row
    assert row["setup_s"] + row["compile_s"] + row["measure_s"] <= wall + 0.01, (row, wall)


def test_under_the_interpreter_only_rows_that_ran_there_say_so():
    """interpret=true on the CPU: a kernel op's fusedrl row is named for the interpreter; a row of
    the model-scale paths (decode, the mixed workload, the sampler, the training micro-batch, the
    RL iterations, MoE), which stay on the PyTorch backend there, keeps its name."""
    from fusedrl.bench.suites import headline
    ctx = context.Context(torch.device("cpu"), FIXED, BenchOptions(quick=True, interpret=True))
    assert ctx.named({"impl": "fusedrl"}, model_paths=False)["impl"] == context.INTERPRETED
    assert ctx.named({"impl": "fusedrl"}, model_paths=True)["impl"] == "fusedrl"
    ops = ("kl_penalty", "gae", "masked_whiten", "ppo_policy_loss", "ppo_value_loss",
           "token_logprobs", "linear_token_logprobs", "grpo_loss", "distill_divergence")
    ours = [case for case in headline.cases(ctx) if any(i.startswith("fusedrl") for i in case.impls)]
    assert len(ours) > 10
    for case in ours:  # the model-scale paths are every case but the kernel ops'
        assert case.model_paths == (case.name.split()[0].split("+")[0] not in ops), case.name


def test_the_runs_deadline_still_stops_a_case():
    def endless():
        time.sleep(5)
        yield {}
    rows = []
    run_case(Case("headline", "endless", ("x", "y"), endless), 0.1, rows.append, 0.2)
    assert [r["status"] for r in rows] == ["not run: time (the run's deadline, 0 s)"] * 2, rows


def test_a_case_stopped_after_some_rows_names_each_row_it_did_not_give():
    """A listed name of several words ("fusedrl CUDA graph") is not taken as given by a row of its
    first word; a one-word peer name is, by its versioned row ("trl 1.16.0")."""
    def partial():
        for impl in ("fusedrl", "trl 1.16.0"):
            yield {"suite": "headline", "name": "p", "impl": impl, "status": "ok",
                   "fraction_of_limit": None, "limit": "-", "seconds": None}
        raise RuntimeError("capture failed")
    rows = []
    run_case(Case("headline", "p", ("fusedrl", "trl", "fusedrl CUDA graph", "liger"), partial),
             None, rows.append)
    assert [(r["impl"], r["status"]) for r in rows[2:]] == [
        ("fusedrl CUDA graph", "error: RuntimeError: capture failed"),
        ("liger", "error: RuntimeError: capture failed")], rows


def test_the_losses_variants_in_one_process_each_get_a_timed_loop_peers_not_installed_skipped(
        monkeypatch):
    monkeypatch.setattr(kernels, "peer_version", lambda dist: None)  # no peer installed
    built = []
    for module in (bench_integrations, bench_distill):
        monkeypatch.setattr(module, "variant_loss", lambda name, *a, _f=module.variant_loss:
                            built.append(name) or _f(name, *a))
    ctx = quick_context()
    rows = []
    for measure, impls in (
            (lambda: kernels.grpo_loss_rows(ctx, (64, 16, 96), here=True),
             ("eager", "fusedrl", "fusedrl recompute", "liger", "trl")),
            (lambda: kernels.distill_rows(ctx, (64, 16, 96), here=True),
             ("eager", "fusedrl", "liger", "trl"))):
        run_case(Case("kernels", "loss", impls, measure), 30.0, rows.append)
    # the peers' losses never built, never imported
    assert built == ["torch", "fusedrl", "fusedrl_recompute", "torch", "fusedrl"]
    ours = [r for r in rows if r["status"] == "ok"]
    assert [r["impl"] for r in ours] == ["eager", "fusedrl", "fusedrl recompute", "eager",
                                         "fusedrl"], rows
    assert all(r["n"] >= 3 and r["seconds_p20"] <= r["seconds"] <= r["seconds_p80"]
               and r["peak_extra_mib"] >= 0 for r in ours), ours
    for row in ours[1:3]:
        assert row["grad_weight_rel_error"] < 1e-4 and row["loss_error"] < 1e-4, row
    assert abs(ours[4]["loss"] - ours[3]["loss"]) <= 1e-5 * abs(ours[3]["loss"]), ours
    assert sorted(r["status"] for r in rows if r["status"] != "ok") == ["not installed"] * 4

"""bench_integrations at a tiny shape: every variant present here runs in its own process, agrees
with plain PyTorch and lands in a complete report. Memory and times are reported, not checked."""
import json

from fusedrl.bench import bench_integrations


def test_report_is_complete_and_variants_agree(tmp_path):
    out = tmp_path / "report.json"
    # TRL's head: the slowest import, run by the bench
    variants = ["torch", "fusedrl", "fusedrl_recompute", "liger"]
    bench_integrations.main(["--shapes", "96,16,300", "--device", "cpu", "--variants", *variants,
                             "--json", str(out)])
    report = json.loads(out.read_text())
    assert {"device", "torch", "git_commit", "peers"} <= set(report["meta"])
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == set(variants)
    ran = [row for row in rows.values() if "error" not in row]
    assert {"torch", "fusedrl", "fusedrl_recompute"} <= {row["variant"] for row in ran}
    for row in ran:
        assert row["peak_extra_mib"] >= 0 and row["loss_error"] < 1e-5, row
        assert row["grad_weight_rel_error"] < 1e-4 and row["grad_hidden_rel_error"] < 1e-4, row

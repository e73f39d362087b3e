"""bench/bench_long_tail runs on tiny settings: the three rollouts replayed through the scheduler,
their counts and modeled times in the JSON (which says they are modeled, and its commit), and the last line the ratio it states."""
import json

from fusedrl.bench import bench_long_tail


def test_partial_and_speculative_rollouts_beside_the_synchronous_one(tmp_path, capsys):
    out = tmp_path / "long_tail.json"
    bench_long_tail.main(["--prompts", "2", "--samples", "4", "--prompt-tokens", "8",
                          "--max-new-tokens", "128", "--median", "24", "--iterations", "3",
                          "--pool-tokens", "8192", "--speculate-below", "64", "--out", str(out)])
    result = json.loads(out.read_text())
    assert "modeled" in result["modeled"] and result["meta"]["git_commit"]
    sync, partial, spec = result["runs"]
    modes = [r["mode"] for r in (sync, partial, spec)]
    assert modes == ["synchronous", "partial", "partial+speculative"]
    assert sync["verify_steps"] == partial["verify_steps"] == 0 < spec["verify_steps"]
    # The same answers: speculation emits several tokens a step, so fewer steps in all.
    assert spec["decode_steps"] + spec["verify_steps"] < partial["decode_steps"]
    assert partial["mean_batch"] > sync["mean_batch"]
    assert partial["prefill_tokens"] > sync["prefill_tokens"]  # carried answers prefilled again
    assert all(r["trained_tokens"] > 0 and r["seconds"] > 0 for r in (sync, partial, spec))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"long tail: partial+speculative / synchronous modeled time per token = " \
                   f"{spec['relative_time_per_token']:.3f}"

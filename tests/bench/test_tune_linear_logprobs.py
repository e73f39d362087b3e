"""bench/tune_linear_logprobs runs (a tiny shape under the interpreter) and reports, per candidate
tile shape, the fused forward and backward recompute beside cuBLAS's GEMM of the same FLOPs."""
import json

import tune_linear_logprobs
from kernel_testing import needs_triton

pytestmark = needs_triton


def test_reports_each_candidate_beside_cublas(tmp_path):
    out = tmp_path / "tune.json"
    tune_linear_logprobs.main(["--quick", "--budget", "0", "--json", str(out)])
    payload = json.loads(out.read_text())
    ways = [(r["way"], r["tiles"] and r["tiles"]["num_stages"]) for r in payload["results"]]
    assert ways == [("cuBLAS logits (same chunks)", None), ("fused forward", 3),
                    ("fused backward recompute", 3), ("fused forward", 4), ("fused backward recompute", 4)]
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in payload["results"])
    assert payload["meta"]["shape"] == {"N": 64, "H": 32, "V": 700}

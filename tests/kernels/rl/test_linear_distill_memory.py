"""linear_distill_divergence's PyTorch row chunks against plain PyTorch (both [N, V] logits,
autograd), in memory: each runs forward + backward in a fresh process (bench/bench_distill.py's
--run-variant) and reports its peak RSS above what it held once the inputs existed. At the
default chunk budget and N=4096, V=32000 the chunks are about N / 32 rows (bench_distill measures
that shape: 0.07x of plain PyTorch's peak on the CPU); here the same N / 32 at a smaller N x V,
so that both runs take a few seconds."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_distill.py"


def peak(variant, n, h, v, *extra):
    done = subprocess.run([sys.executable, str(BENCH), "--run-variant", variant, str(n), str(h),
                           str(v), "--device", "cpu", *extra], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_peak_memory_is_a_fraction_of_plain_pytorchs():
    n, h, v = 1024, 32, 8192
    plain = peak("torch", n, h, v)
    ours = peak("fusedrl", n, h, v, "--chunk-size", str(n // 32))
    # plain PyTorch holds several fp32 [N, V] buffers (32 MiB each here) at its peak
    assert plain["peak_extra_mib"] > 3 * n * v * 4 / 2**20, plain
    assert ours["peak_extra_mib"] <= 0.3 * plain["peak_extra_mib"], (ours, plain)
    assert abs(ours["loss"] - plain["loss"]) <= 1e-5 * abs(plain["loss"])

"""The GRPO loss from hidden states, side by side: ours (FusedLinearGRPOLoss, defaults: no
chunk_size), Liger's (LigerFusedLinearGRPOLoss, compiled=False), TRL 1.x's fused head
(trl.kernels ChunkedLogProbFunction) with TRL's loss written out, and plain PyTorch (the [N, V]
logits, log_softmax, gather). Same inputs for all ([B, T, H] hidden, [V, H] head, ratio != 1,
beta 0.04, loss_type grpo), saved once with safetensors and loaded by each variant.

Per variant: the loss and its gradients (compared with plain PyTorch's), the peak extra memory of
forward + backward and the time. On the CPU each variant in a fresh process (the process's peak RSS
above what it held before; one run); on a GPU `fusedrl bench` measures them in its own process one
after another (measure_here: max_memory_allocated above the allocated, the memory freed between
them, the time of a time-budgeted loop), this script in a process each (the median of three).
Results JSON: commit, device, versions, per shape and variant.

    python bench/bench_integrations.py [--shapes N,H,V ...] [--json out.json]

Liger and TRL 1.x come from the directory .ci/run installs them in (.ci-trl, --trl-dir), put first
on the variants' path; a variant that cannot run says why in its row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from fusedrl.bench import harness
from fusedrl.bench.context import free_device

HERE = Path(__file__).resolve().parent

# "fusedrl_recompute": ours with grads_in_forward=False (the head's logits made again in backward),
# the A/B of the default's gradients in the forward (kernels/rl/linear_logprobs_loss.py).
VARIANTS = ("torch", "fusedrl", "fusedrl_recompute", "liger", "trl_head")
BETA, EPS, ROWS_PER_SEQ = 0.04, 0.2, 512


def make_inputs(n: int, h: int, v: int, device: torch.device = torch.device("cpu")) -> dict:
    """[B, T, H] hidden (B x T = n), [V, H] head, ids, a completion mask with padded tails, [B]
    advantages, and old/ref log-probs near the policy's (so the ratio is near, not at, 1), made on
    `device`, the same numbers in every process there (a seeded generator on it: the host draws
    Liger's shape's 542M normal samples in seconds, a GPU in milliseconds; the log-probs' [T, V]
    products are 4 TFLOP, 14.5 s of the H200 visit's host CPU)."""
    gen = torch.Generator(device).manual_seed(0)
    t = min(n, ROWS_PER_SEQ)
    b = n // t

    def normal(*shape):
        return torch.randn(*shape, generator=gen, device=device)
    hidden = normal(b, t, h)
    weight = normal(v, h) / h**0.5
    ids = torch.randint(0, v, (b, t), generator=gen, device=device)
    mask = torch.ones(b, t, device=device)
    for row in range(b):
        cut = torch.randint(0, t // 4 + 1, (1,), generator=gen, device=device)
        mask[row, t - int(cut):] = 0
    advantages = normal(b)
    old_noise, ref_noise = (0.05 * normal(b, t) for _ in range(2))
    x = {"hidden": hidden, "weight": weight, "ids": ids, "mask": mask, "advantages": advantages}
    logp = torch.cat([torch.log_softmax(x["hidden"][i] @ x["weight"].t(), -1)
                      .gather(-1, x["ids"][i, :, None]).squeeze(-1)[None] for i in range(b)])
    return {**x, "old": logp + old_noise, "ref": logp + ref_noise}


def trl_loss(logp, old, ref, advantages, mask):
    """TRL 1.x's grpo loss of per-token log-probs (its _compute_loss, bias-corrected KL)."""
    coef_1 = torch.exp(logp - old)
    coef_2 = coef_1.clamp(1 - EPS, 1 + EPS)
    per_token = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = per_token + BETA * kl * coef_1
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


def variant_loss(name: str):
    """The variant's loss as a function of (inputs x, hidden, weight); its imports done here, so
    that they are not counted in its memory."""
    if name == "torch":
        def loss(x, hidden, weight):
            logp = torch.log_softmax(hidden @ weight.t(), -1).gather(-1, x["ids"][..., None])
            return trl_loss(logp.squeeze(-1), x["old"], x["ref"], x["advantages"], x["mask"])
        return loss
    if name in ("fusedrl", "fusedrl_recompute", "liger"):
        if name != "liger":
            from fusedrl.kernels.integrations import FusedLinearGRPOLoss
            module = FusedLinearGRPOLoss(beta=BETA, loss_type="grpo", use_bias_correction_kl=True,
                                         grads_in_forward=None if name == "fusedrl" else False)
        else:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
            module = LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, loss_type="grpo",
                                              use_bias_correction_kl=True)
        return lambda x, hidden, weight: module(
            hidden, weight, x["ids"], x["mask"], x["advantages"], ref_per_token_logps=x["ref"],
            old_per_token_logps=x["old"])[0]
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    def trl_head(x, hidden, weight):
        b, t, h = hidden.shape
        logp = ChunkedLogProbFunction.apply(hidden.reshape(b * t, h), weight, None,
                                            x["ids"].reshape(-1), 1.0, 32768, None, 1.0,
                                            ("log_probs",))[0].reshape(b, t)
        return trl_loss(logp, x["old"], x["ref"], x["advantages"], x["mask"])
    return trl_head


def run_variant(name: str, inputs_path: str, grads_path: str, device: str) -> dict:
    """One variant in this process: forward + backward once, its peak extra memory and time."""
    dev = torch.device(device)
    x = {k: v.to(dev) for k, v in load_file(inputs_path).items()}
    hidden = x["hidden"].requires_grad_()
    weight = x["weight"].requires_grad_()

    loss_fn = variant_loss(name)

    def step():
        loss = loss_fn(x, hidden, weight)
        loss.backward()
        return loss

    loss, peak, seconds = harness.first_call_peak(step, dev)
    if dev.type == "cuda":
        hidden.grad = weight.grad = None
        seconds = harness.time_ms(step, dev, min_reps=3) / 1e3
    save_file({"loss": loss.detach().reshape(1).cpu(), "hidden": hidden.grad.cpu(),
               "weight": weight.grad.cpu()}, grads_path)
    return {"peak_extra_mib": peak / 2**20, "seconds": seconds}


def measure_here(n: int, h: int, v: int, variants: dict, device: torch.device,
                 budget_s: float) -> Iterator[dict]:
    """Each variant in this process, one after another (harness.variant_here: the allocator's
    peak each one's own, the memory freed between them), its row (as bench_shape's, the errors
    against plain PyTorch's, "torch", which comes first) yielded as it is measured. variants:
    name -> whether it runs here (False: a peer not installed, not imported; its row has no
    figures)."""
    x = make_inputs(n, h, v, device)
    oracle = None
    for name, runs in variants.items():
        row = {"variant": name, "n": n, "h": h, "v": v}
        if runs:
            try:
                measured = _variant_here(name, x, device, budget_s)
            except Exception as error:  # noqa: BLE001 - a variant that cannot run is its row
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            else:
                grads = {"loss": measured.pop("loss"), **measured.pop("grads")}
                oracle = grads if name == "torch" else oracle
                row.update(measured)
                if oracle is not None:
                    compare(row, grads, oracle)
                del grads
        free_device(device)
        yield row


def _variant_here(name: str, x: dict, device: torch.device, budget_s: float) -> dict:
    hidden = x["hidden"].detach().requires_grad_()
    weight = x["weight"].detach().requires_grad_()
    loss_fn = variant_loss(name)

    def step():
        loss = loss_fn(x, hidden, weight)
        loss.backward()
        return loss
    return harness.variant_here(step, lambda: {"hidden": hidden.grad, "weight": weight.grad},
                                device, budget_s)


def versions(trl_dir: str) -> dict:
    """The peers' versions, read in a process with trl_dir on its path."""
    code = ("import json, importlib.metadata as m\nout = {}\n"
            "for p in ('trl', 'liger-kernel', 'transformers'):\n"
            "    try: out[p] = m.version(p)\n    except Exception: out[p] = None\n"
            "print(json.dumps(out))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": trl_dir})
    return json.loads(done.stdout) if done.returncode == 0 else {}


def compare(row: dict, grads: dict, oracle: dict) -> None:
    """Loss and gradient errors against plain PyTorch's, relative to its largest entry."""
    row["loss"] = grads["loss"].item()
    row["loss_error"] = abs(row["loss"] - oracle["loss"].item())
    for name in ("hidden", "weight"):
        scale = oracle[name].abs().max().item() or 1.0
        row[f"grad_{name}_rel_error"] = (grads[name] - oracle[name]).abs().max().item() / scale


def bench_shape(n: int, h: int, v: int, args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_integrations_") as tmp:
        inputs_path = os.path.join(tmp, "inputs.safetensors")
        made = make_inputs(n, h, v, torch.device(args.device))  # products on the device measured
        save_file({k: t.cpu() for k, t in made.items()}, inputs_path)
        results = {}
        for name in args.variants:
            grads_path = os.path.join(tmp, f"{name}.safetensors")
            done = subprocess.run([sys.executable, __file__, "--run-variant", name, inputs_path,
                                   grads_path, "--device", args.device], capture_output=True,
                                  text=True, env={**os.environ, "PYTHONPATH": args.trl_dir})
            row = {"variant": name, "n": n, "h": h, "v": v}
            if done.returncode != 0:
                row["error"] = done.stderr.strip().splitlines()[-1] if done.stderr else "failed"
            else:
                row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                results[name] = load_file(grads_path)
            rows.append(row)
        for row in rows:
            if row["variant"] in results and "torch" in results:
                compare(row, results[row["variant"]], results["torch"])
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["4096,256,32000"],
                        help="N,H,V (the issue's grid on a GPU: 4096/16384 x 896/3584 x 32000/"
                             "151936)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trl-dir", default=str(HERE.parent / ".ci-trl"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--run-variant", nargs=3, metavar=("NAME", "INPUTS", "GRADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_variant:
        print(json.dumps(run_variant(*args.run_variant, args.device)))
        return {}
    rows = []
    for shape in args.shapes:
        n, h, v = map(int, shape.split(","))
        rows += bench_shape(n, h, v, args)
    report = {"meta": {**harness.run_metadata(torch.device(args.device)),
                       "peers": versions(args.trl_dir),
                       "memory": "peak RSS above the process's before (CPU) or "
                                 "max_memory_allocated above allocated (GPU), forward + backward"},
              "rows": rows}
    print(harness.format_table(rows, [("variant", "variant"), ("n", "N"), ("h", "H"), ("v", "V"),
                                      ("peak_extra_mib", "peak MiB"), ("seconds", "s"),
                                      ("loss_error", "loss err"),
                                      ("grad_weight_rel_error", "d W rel err")]))
    if args.json:
        harness.write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()

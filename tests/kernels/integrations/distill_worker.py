"""Run under TRL 1.x and Liger (their directory first on sys.path, see test_distill_hosts.py): our
divergence at their call shapes against their own code. Prints one JSON line of the errors
measured."""
import json
import sys
import tempfile

import torch
import transformers

from trl_worker import VOCAB, dataset, signature_gaps, tokenizer

PROMPT, COMPLETION, ROWS = 5, 7, 4


def rel_error(a, b):
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12)


def head_inputs(gen, shape, hs, ht, vocab):
    """Student and teacher hidden states of leading ``shape`` (the teacher wider) and heads."""
    return (torch.randn(*shape, hs, generator=gen).requires_grad_(),
            (torch.randn(vocab, hs, generator=gen) * 0.6).requires_grad_(),
            torch.randn(*shape, ht, generator=gen), torch.randn(vocab, ht, generator=gen) * 0.5)


def trl_loss_errors():
    """TRL's _chunked_divergence_loss and ours on [B, K, H] inputs: biases, a logit scale, a soft
    cap on the teacher, a float completion mask with padded tails, with and without
    num_items_in_batch, for beta 0, 0.5, 1 and temperatures 1 and 0.7."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    from fusedrl.kernels.integrations.distill import chunked_divergence_loss
    gen = torch.Generator().manual_seed(0)
    errors = {}
    for beta in (0.0, 0.5, 1.0):
        for temperature in (1.0, 0.7):
            for items in (None, 13):
                hs, ws, ht, wt = head_inputs(gen, (3, 6), 8, 12, 41)
                bias_s = torch.randn(41, generator=gen).requires_grad_()
                mask = torch.ones(3, 6)
                mask[0, 4:] = 0
                mask[2, 1:] = 0
                kwargs = dict(num_items_in_batch=items, student_lm_head_bias=bias_s,
                              teacher_lm_head_bias=torch.randn(41, generator=gen),
                              student_logit_scale=1.3, teacher_final_logit_softcapping=5.0,
                              temperature=temperature)
                results = []
                for fn in (_chunked_divergence_loss, chunked_divergence_loss):
                    loss, entropy_sum, n_valid = fn(hs, ht, ws, wt, mask, beta, **kwargs)
                    grads = torch.autograd.grad(loss, (hs, ws, bias_s))
                    results.append((loss, entropy_sum, n_valid, grads))
                (l0, e0, n0, g0), (l1, e1, n1, g1) = results
                errors[f"beta={beta},T={temperature},items={items}"] = {
                    "loss": rel_error(l1, l0), "entropy": rel_error(e1, e0),
                    "n_valid": int(n1) - int(n0), "loss_value": l0.item(),
                    "grad": max(rel_error(a, b) for a, b in zip(g1, g0))}
    return errors


def liger_errors():
    """Liger's LigerFusedLinearJSD and our FusedLinearJSD at Liger's call shape: labels with
    ignored rows, and none; jsd_beta 0, 0.3, 1 (TRL's convention on both sides)."""
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    from fusedrl.kernels.integrations import FusedLinearJSD
    gen = torch.Generator().manual_seed(1)
    errors = {}
    for beta in (0.0, 0.3, 1.0):
        for labelled in (True, False):
            hs, ws, ht, wt = head_inputs(gen, (11,), 6, 10, 37)
            labels = torch.randint(0, 37, (11,), generator=gen)
            labels[:4] = -100
            labels = labels if labelled else None
            results = []
            for cls in (LigerFusedLinearJSD, FusedLinearJSD):
                loss = cls(beta, -100, 0.7, torch.float32)(hs, ws, ht, wt, labels)
                results.append((loss, torch.autograd.grad(loss, (hs, ws))))
            (l0, g0), (l1, g1) = results
            errors[f"beta={beta},labels={labelled}"] = {
                "loss": rel_error(l1, l0), "loss_value": l0.item(),
                "grad": max(rel_error(a, b) for a, b in zip(g1, g0))}
    return errors


def liger_loss_errors():
    """Liger's LigerFusedLinearJSDLoss and our FusedLinearJSDLoss built from the same arguments
    (by position and by keyword; Liger's compiled=False, which changes nothing in ours) on the
    same inputs: the default (half cross-entropy), the issue's positional (0.0, 1.0, 0.5), the
    hard term alone, biases on both heads, a teacher's head padded past the student's
    vocabulary, return_soft_hard_loss; loss(es) and the student's gradients. Also both Liger
    classes' signatures against ours."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    from fusedrl.kernels.integrations import FusedLinearJSD, FusedLinearJSDLoss
    gaps = [gap for ours, theirs in ((FusedLinearJSDLoss, LigerFusedLinearJSDLoss),
                                     (FusedLinearJSD, LigerFusedLinearJSD))
            for name in ("__init__", "forward")
            for gap in signature_gaps(getattr(ours, name), getattr(theirs, name))]
    gen = torch.Generator().manual_seed(3)
    cases = {"default": ((), {}, {}), "positional": ((0.0, 1.0, 0.5), {}, {}),
             "hard_only": ((1.0, 0.0, 0.3, -100, 0.7), {}, {}),
             "biases": ((), dict(beta=1.0, temperature=0.7), dict(biases=True)),
             "padded_teacher": ((0.2, 0.8, 0.0), {}, dict(biases=True, pad=3)),
             "soft_hard": ((0.3, 0.7, 0.5, -1, 2.0, False, 4, True), {}, dict(ignore=-1))}
    errors = {"signature_gaps": gaps}
    for name, (args, kwargs, shape) in cases.items():
        hs, ws, ht, wt = head_inputs(gen, (13,), 6, 10, 37)
        wt = torch.cat([wt, torch.randn(shape.get("pad", 0), 10, generator=gen)])
        labels = torch.randint(0, 37, (13,), generator=gen)
        labels[:4] = shape.get("ignore", -100)
        bs = torch.randn(37, generator=gen).requires_grad_() if shape.get("biases") else None
        bt = torch.randn(wt.shape[0], generator=gen) if shape.get("biases") else None
        results = []
        for cls in (LigerFusedLinearJSDLoss, FusedLinearJSDLoss):
            theirs = cls is LigerFusedLinearJSDLoss and len(args) < 6
            module = cls(*args, **kwargs, **({"compiled": False} if theirs else {}))
            out = module(hs, ws, ht, wt, labels, bs, bt)
            losses = out if isinstance(out, tuple) else (out,)
            inputs = (hs, ws) if bs is None else (hs, ws, bs)
            results.append((torch.stack(losses), torch.autograd.grad(losses[0], inputs)))
        (l0, g0), (l1, g1) = results
        errors[name] = {"loss": rel_error(l1, l0), "loss_value": l0[0].item(),
                        "outputs": len(l1), "grad": max(rel_error(a, b) for a, b in zip(g1, g0))}
    return errors


def tiny_qwen2(hidden, layers, seed):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=hidden,
                                      intermediate_size=2 * hidden, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, eos_token_id=1, pad_token_id=0,
                                      tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config).float()


def trainer_errors():
    """TRL's DistillationTrainer and FusedDistillationTrainer from the same student and a wider
    teacher: compute_loss on one batch of padded completions (num_items_in_batch as TRL's
    generation sets it), per beta; |loss| difference and the students' gradients."""
    from trl import DistillationConfig, DistillationTrainer
    from fusedrl.kernels.integrations.trl import FusedDistillationTrainer
    gen = torch.Generator().manual_seed(2)
    prompt_ids = torch.randint(2, VOCAB, (ROWS, PROMPT), generator=gen)
    completion_ids = torch.randint(2, VOCAB, (ROWS, COMPLETION), generator=gen)
    completion_mask = torch.ones(ROWS, COMPLETION, dtype=torch.long)
    completion_mask[0, 4:] = 0
    completion_mask[3, 2:] = 0
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids),
                  completion_ids=completion_ids, completion_mask=completion_mask,
                  num_items_in_batch=completion_mask.sum().float())
    errors = {}
    for beta in (0.0, 0.5, 1.0):
        runs = []
        for cls in (DistillationTrainer, FusedDistillationTrainer):
            args = DistillationConfig(output_dir=tempfile.mkdtemp(), beta=beta, temperature=0.7,
                                      per_device_train_batch_size=ROWS,
                                      max_completion_length=COMPLETION, use_cpu=True,
                                      report_to=[], save_strategy="no", disable_tqdm=True,
                                      seed=0, bf16=False)
            trainer = cls(model=tiny_qwen2(32, 2, 0), teacher_model=tiny_qwen2(48, 3, 1),
                          args=args, train_dataset=dataset(), processing_class=tokenizer())
            model = trainer.model.train()
            model.zero_grad()
            loss = trainer.compute_loss(model, dict(inputs))
            loss.backward()
            runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()],
                         trainer._metrics["train"]["entropy"][-1]))
        (l0, g0, e0), (l1, g1, e1) = runs
        errors[f"beta={beta}"] = {"loss": abs(l1.item() - l0.item()), "loss_value": l0.item(),
                                  "entropy": abs(e1 - e0),
                                  "grad": max(rel_error(a, b) for a, b in zip(g1, g0))}
    return errors


CHECKS = {"trl_loss": trl_loss_errors, "liger": liger_errors, "liger_loss": liger_loss_errors,
          "trainer": trainer_errors}


if __name__ == "__main__":
    # argv: check names, all in this one process (importing TRL is most of a run)
    print(json.dumps({name: CHECKS[name]() for name in sys.argv[1:]}))

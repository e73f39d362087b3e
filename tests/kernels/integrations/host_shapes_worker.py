"""Run under TRL 1.x and Liger (their directory first on sys.path, see test_host_shapes.py): our
GRPO loss and trainer at the hosts' shapes, side by side with TRL's and Liger's own code on the
same inputs (sequence-level ratios with per-token IS ratios and advantages, float masks, beta
without a reference, the fp32 head cast, a mixture of experts, TRL's metric names). Prints one
JSON line: {check: result}."""
import json
import sys
import tempfile

import torch
import transformers

from trl_worker import COMPLETION, PROMPT, ROWS, VOCAB, config, dataset, reward, tokenizer
from trl_worker import signature_gaps, tiny_qwen2_dir

B, T, H, V = 5, 9, 16, 37


def rel(a, b):
    """|a - b| relative to |b|'s largest entry."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def liger_inputs(seed=0):
    """Hidden states, head, ids, a float mask (weights in (0, 1], an empty row), per-token IS
    ratios and the logps around the policy's, fp32."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.rand(B, T, generator=gen) * 0.9 + 0.1
    mask[1, 5:] = 0
    mask[3, :] = 0
    mask[4, 2] = 0
    with torch.no_grad():
        logits = hidden @ weight.T
        logp = logits.log_softmax(-1).gather(-1, ids[..., None])[..., 0]
    noise = lambda scale: scale * torch.randn(B, T, generator=gen)  # noqa: E731
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask,
                adv=torch.randn(B, generator=gen), is_ratio=noise(0.3).exp(),
                old=logp + noise(0.15), ref=logp + noise(0.15))


def run_loss(module, x, *, mask=None, is_ratio=None, ref=True, items=None):
    """(loss, d hidden, d weight, metrics) of a Liger-shaped GRPO loss module on inputs x."""
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    loss, metrics = module(hidden, weight, x["ids"], x["mask"] if mask is None else mask,
                           x["adv"], ref_per_token_logps=x["ref"] if ref else None,
                           old_per_token_logps=x["old"], vllm_is_ratio=is_ratio,
                           num_items_in_batch=items)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad, [float(m) for m in metrics]


def against_liger(ours_kwargs, call_kwargs, seed=0):
    """Ours and Liger's on the same inputs: relative errors of loss, gradients, metrics."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from fusedrl.kernels.integrations import FusedLinearGRPOLoss
    x = liger_inputs(seed)
    theirs = run_loss(LigerFusedLinearGRPOLoss(compiled=False, **ours_kwargs), x, **call_kwargs)
    ours = run_loss(FusedLinearGRPOLoss(**ours_kwargs), x, **call_kwargs)
    return {"loss": rel(ours[0], theirs[0]), "d_hidden": rel(ours[1], theirs[1]),
            "d_weight": rel(ours[2], theirs[2]), "metrics": ours[3], "their_metrics": theirs[3],
            "grad_norm": theirs[1].abs().max().item()}


def liger_sequence(_):
    """importance_sampling_level="sequence" with [B, T] and [B, 1] IS ratios, each loss type
    Liger runs at sequence level, a float mask and a binary one."""
    x = liger_inputs()
    binary = (x["mask"] != 0).float()
    out = {}
    for loss_type in ("grpo", "dr_grpo"):   # a row mean and a token sum (float masks: below)
        kwargs = dict(loss_type=loss_type, importance_sampling_level="sequence", beta=0.04,
                      epsilon_high=0.28, max_completion_length=T, use_bias_correction_kl=True)
        out[f"{loss_type}/token_is"] = against_liger(kwargs, dict(is_ratio=x["is_ratio"],
                                                                  mask=binary))
        out[f"{loss_type}/row_is_float_mask"] = against_liger(
            kwargs, dict(is_ratio=x["is_ratio"][:, :1]))
    return out


def liger_float_mask(_):
    """A float mask at token level for every loss type Liger shares with us, with
    num_items_in_batch, with delta, and the old behaviour behind binary_mask=True."""
    out = {}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"):
        eps = 5.0 if loss_type == "cispo" else 0.28
        out[loss_type] = against_liger(dict(loss_type=loss_type, beta=0.04, epsilon_high=eps,
                                            max_completion_length=T,
                                            use_bias_correction_kl=True), {})
    out["dapo/items"] = against_liger(dict(loss_type="dapo", beta=0.04), dict(items=30.0))
    out["dapo/delta"] = against_liger(dict(loss_type="dapo", beta=0.0, delta=1.5), {})
    from fusedrl.kernels.integrations import FusedLinearGRPOLoss
    x = liger_inputs()
    binary = run_loss(FusedLinearGRPOLoss(beta=0.04, binary_mask=True), x)[0]
    as_ones = run_loss(FusedLinearGRPOLoss(beta=0.04), x, mask=(x["mask"] != 0).float())[0]
    weighted = run_loss(FusedLinearGRPOLoss(beta=0.04), x)[0]
    out["binary_mask"] = {"as_ones": rel(binary, as_ones), "weighted": rel(weighted, binary)}
    return out


def liger_no_reference(_):
    """beta != 0 without reference log-probs: Liger's error and ours; with use_ref_model=False
    Liger's metrics [kl = 0, clip] and ours, loss and gradients."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from fusedrl.kernels.integrations import FusedLinearGRPOLoss
    x = liger_inputs()
    refused = {}
    for name, module in (("liger", LigerFusedLinearGRPOLoss(compiled=False)),
                         ("ours", FusedLinearGRPOLoss())):
        try:
            run_loss(module, x, ref=False)
            refused[name] = ""
        except (AssertionError, ValueError) as error:
            refused[name] = f"{type(error).__name__}: {error}"
    no_ref = against_liger(dict(beta=0.04, use_ref_model=False), dict(ref=False))
    no_ref_given = against_liger(dict(beta=0.04, use_ref_model=False, loss_type="grpo"), {})
    no_beta = against_liger(dict(beta=0.0, loss_type="bnpo", use_ref_model=False), dict(ref=False))
    return {"refused": refused, "no_ref": no_ref, "no_ref_given": no_ref_given,
            "no_beta": no_beta}


def trainer_inputs(trainer, seed=1, float_mask=True, token_advantages=True):
    """Rollout inputs as TRL's _generate_and_score_completions leaves them, made up: ratio != 1,
    a reference, a float completion mask (an empty row), [B, T] advantages."""
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(2, VOCAB, (ROWS, PROMPT), generator=gen)
    completion_ids = torch.randint(2, VOCAB, (ROWS, COMPLETION), generator=gen)
    mask = torch.ones(ROWS, COMPLETION)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    if float_mask:
        mask = mask * (torch.rand(ROWS, COMPLETION, generator=gen) * 0.9 + 0.1)
    with torch.no_grad():
        base = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([torch.ones_like(prompt_ids), (mask != 0).long()], 1), COMPLETION)[0]
    shape = (ROWS, COMPLETION) if token_advantages else (ROWS,)
    noise = lambda: 0.3 * torch.randn(base.shape, generator=gen)  # noqa: E731
    return dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids),
                completion_ids=completion_ids, completion_mask=mask,
                advantages=torch.randn(shape, generator=gen), old_per_token_logps=base + noise(),
                ref_per_token_logps=base + noise(), num_items_in_batch=mask.sum())


def compute_loss(trainer, inputs):
    """(loss, every parameter's gradient, the metrics logged) of one _compute_loss call."""
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1   # set by train(); this calls the loss alone
    trainer._metrics["train"].clear()
    model.zero_grad()
    loss = trainer._compute_loss(model, inputs)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return loss.item(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trainers(loss_type, extra, path=None):
    """TRL's GRPOTrainer and our FusedGRPOTrainer built alike from one tiny model directory."""
    from trl import GRPOTrainer
    from fusedrl.kernels.integrations.trl import FusedGRPOTrainer
    path = path or tiny_qwen2_dir()
    built = []
    for cls in (GRPOTrainer, FusedGRPOTrainer):
        transformers.set_seed(0)
        built.append(cls(model=path, reward_funcs=reward, processing_class=tokenizer(),
                         args=config(loss_type, tempfile.mkdtemp(), **extra),
                         train_dataset=dataset()))
    return built


def trl_loss(spec):
    """TRL's _compute_loss and ours (our trainer's) on the same made-up inputs: loss, gradients
    and the metrics by name. spec: LOSS_TYPE/LEVEL[/binary] (binary: 0/1 mask, [B] adv)."""
    loss_type, level, *rest = spec.split("/")
    eps = 5.0 if loss_type == "cispo" else 0.28
    theirs_trainer, ours_trainer = trainers(loss_type, dict(importance_sampling_level=level,
                                                            epsilon_high=eps))
    binary = rest == ["binary"]
    inputs = trainer_inputs(theirs_trainer, float_mask=not binary, token_advantages=not binary)
    theirs, ours = compute_loss(theirs_trainer, inputs), compute_loss(ours_trainer, inputs)
    return {"loss": abs(ours[0] - theirs[0]), "loss_value": theirs[0],
            "grad": rel(ours[1], theirs[1]), "cosine": torch.nn.functional.cosine_similarity(
                ours[1], theirs[1], dim=0).item(),
            "metrics": ours[2], "their_metrics": theirs[2], "fallback": ours_trainer._fallback}


def fp32_head(_):
    """cast_lm_head_to_fp32=True under bf16 autocast: each trainer's log-probs against float64
    ones of the same model and its own bf16 backbone."""
    theirs, ours = trainers("grpo", dict(bf16=True, cast_lm_head_to_fp32=True))
    inputs = trainer_inputs(theirs, float_mask=False, token_advantages=False)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], (inputs["completion_mask"] != 0).long()], 1)
    out = {}
    for name, trainer in (("trl", theirs), ("ours", ours)):
        with torch.no_grad():
            logp = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention,
                                                              COMPLETION)[0]
            with trainer.accelerator.autocast():
                hidden = trainer.model.model(input_ids=ids, attention_mask=attention)
            hidden = hidden.last_hidden_state[:, PROMPT - 1:-1].double()
            head = trainer.model.lm_head.weight.double()
            exact = (hidden @ head.T).log_softmax(-1).gather(
                -1, inputs["completion_ids"][..., None])[..., 0]
        valid = inputs["completion_mask"] != 0
        out[name] = {"error": (logp.double() - exact)[valid].abs().max().item(),
                     "head_dtype": str(trainer.model.lm_head.weight.dtype), "logp": logp}
    out["ours_vs_trl"] = (out["ours"].pop("logp") - out["trl"].pop("logp")).abs().max().item()
    return out


def tiny_qwen3_moe_dir():
    """A tiny Qwen3-MoE (4 experts, 2 per token, a load-balancing loss) saved to a directory."""
    torch.manual_seed(0)
    config_ = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
        router_aux_loss_coef=0.05, max_position_embeddings=64, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=False)
    path = tempfile.mkdtemp(prefix="tiny_qwen3_moe_")
    transformers.Qwen3MoeForCausalLM(config_).float().save_pretrained(path)
    return path


def moe(_):
    """TRL's trainer and ours on a tiny Qwen3-MoE: one _compute_loss each (aux loss included),
    then two training steps each from the same weights and seed."""
    path = tiny_qwen3_moe_dir()
    theirs_trainer, ours_trainer = trainers("grpo", {}, path)
    inputs = trainer_inputs(theirs_trainer, float_mask=False, token_advantages=False)
    theirs, ours = compute_loss(theirs_trainer, inputs), compute_loss(ours_trainer, inputs)
    runs = {}
    for trainer in trainers("grpo", {}, path):
        transformers.set_seed(0)   # both built first: each trains from the same random state
        trainer.train()
        runs[type(trainer).__name__] = (
            [h["loss"] for h in trainer.state.log_history if "loss" in h],
            [h["aux_loss"] for h in trainer.state.log_history if "aux_loss" in h],
            [p.detach() for p in trainer.model.parameters()])
    (t_loss, t_aux, t_params), (o_loss, o_aux, o_params) = runs.values()
    return {"loss": abs(ours[0] - theirs[0]), "grad": rel(ours[1], theirs[1]),
            "metrics": ours[2], "their_metrics": theirs[2], "fallback": ours_trainer._fallback,
            "train_losses": o_loss, "their_train_losses": t_loss, "aux": o_aux, "their_aux": t_aux,
            "params": max((a - b).abs().max().item() for a, b in zip(o_params, t_params))}


def engine_trainer(_):
    """TRL 1.16's GRPOConfig and DistillationConfig handed to our engine's trainers: every field of
    each walked. At TRL's defaults both translate (the options they give); each field without a
    translation, set to a value of no meaning to TRL's checks, is refused in a line of its own;
    a few set values translate to their options; several refusals at once give one line each."""
    import copy
    import dataclasses
    from trl import DistillationConfig, GRPOConfig
    from fusedrl.engine import DistillTrainer, GRPOTrainer
    from fusedrl.engine.config.aliases import has_key
    from fusedrl.engine.config.trl_config import TRANSLATIONS, _inert
    out = tempfile.mkdtemp()
    result = {}
    for trl_cls, trainer_cls in ((GRPOConfig, GRPOTrainer), (DistillationConfig, DistillTrainer)):
        name = trl_cls.__name__
        base = trl_cls(output_dir=out, use_cpu=True, report_to=[])
        args = trainer_cls(model=out, args=base).args
        walked = {}
        for field in dataclasses.fields(base):
            if field.name in TRANSLATIONS[name]:
                walked[field.name] = "translated"
                continue
            changed = copy.copy(base)
            setattr(changed, field.name, ("set by the test",))
            try:
                trainer_cls(model=out, args=changed)
                walked[field.name] = "taken"
            except ValueError as error:
                lines = str(error).splitlines()
                walked[field.name] = ("refused" if len(lines) == 2 and
                                      lines[1].startswith(f"  {field.name}=") else str(error))
            if _inert(field.name, changed):
                walked[field.name] = "inert"
        keys = [key for key in translated(base, name) if not has_key(type(args), key)]
        result[name] = {"walked": walked, "unknown_keys": keys,
                        "lr": args.optim.lr, "max_new_tokens": args.rollout.max_new_tokens,
                        "device": args.train.device}
    grpo = GRPOTrainer(model=out, args=GRPOConfig(
        output_dir=out, use_cpu=True, report_to=[], learning_rate=3e-5, beta=0.02,
        use_bias_correction_kl=False, epsilon_high=0.28, loss_type="dr_grpo",
        num_generations=4, generation_batch_size=16, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, importance_sampling_level="sequence", scale_rewards="none",
        max_completion_length=48, temperature=0.9, max_steps=7, bf16=False)).args
    result["grpo_set"] = {
        "lr": grpo.optim.lr, "kl_loss_coef": grpo.ppo.kl_loss_coef,
        "clip_eps_high": grpo.ppo.clip_eps_high, "agg": grpo.ppo.agg,
        "loss_agg_norm": grpo.ppo.loss_agg_norm, "samples_per_prompt":
        grpo.rollout.samples_per_prompt, "prompts_per_iteration": grpo.rollout.prompts_per_iteration,
        "minibatch_size": grpo.ppo.minibatch_size, "ratio_level": grpo.ppo.ratio_level,
        "estimator": grpo.ppo.estimator, "temperature": grpo.rollout.temperature,
        "iterations": grpo.train.iterations, "precision": grpo.train.precision}
    distill = DistillTrainer(model=out, args=DistillationConfig(
        output_dir=out, use_cpu=True, report_to=[], beta=0.5, temperature=0.8,
        teacher_model_name_or_path="teacher-dir")).args
    result["distill_set"] = {"beta": distill.distill.beta, "temperature": distill.distill.temperature,
                             "rollout_temperature": distill.rollout.temperature,
                             "teacher": distill.teacher}
    try:
        GRPOTrainer(model=out, args=GRPOConfig(output_dir=out, use_cpu=True, loss_type="sapo",
                                               lr_scheduler_type="cosine", use_vllm=True))
        result["refusals"] = ""
    except ValueError as error:
        result["refusals"] = f"{type(error).__name__}: {error}"
    try:
        GRPOTrainer(model=out, args=DistillationConfig(output_dir=out, use_cpu=True))
        result["wrong_trainer"] = ""
    except ValueError as error:
        result["wrong_trainer"] = f"{type(error).__name__}: {error}"
    return result


def translated(config, name):
    """The flat {our key: value} a TRL config at its values translates to."""
    from fusedrl.engine.config.trl_config import TRANSLATIONS
    flat = {}
    for field, translate in TRANSLATIONS[name].items():
        flat.update(translate(getattr(config, field), config))
    return flat



def liger_api(_):
    """LigerFusedLinearGRPOLoss's constructor and forward, taken whole: the signatures; luspo and
    vespo (Liger's vespo shapes given by position), the reference as ref_input through
    ref_weight, ref_weight / ref_bias without ref_input; loss, gradients and metrics."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    from fusedrl.kernels.integrations import FusedLinearGRPOLoss
    gaps = (signature_gaps(FusedLinearGRPOLoss.__init__, LigerFusedLinearGRPOLoss.__init__)
            + signature_gaps(FusedLinearGRPOLoss.forward, LigerFusedLinearGRPOLoss.forward))
    x = liger_inputs(3)
    ones = torch.ones(B, T)
    out = {"signature_gaps": gaps}
    # luspo: TRL 1.16's and Liger's aggregations agree at sequence level without a KL term, and
    # with a mask of ones (module docstring of grpo_loss.py)
    out["luspo/sequence"] = against_liger(dict(loss_type="luspo", beta=0.0,
                                               importance_sampling_level="sequence"), {}, 3)
    out["luspo/token_ones"] = against_liger(dict(loss_type="luspo", epsilon_high=0.28),
                                            dict(mask=ones, is_ratio=x["is_ratio"]), 3)
    out["vespo/float_mask"] = against_liger(dict(loss_type="vespo", beta=0.04),
                                            dict(is_ratio=x["is_ratio"]), 3)
    out["vespo/items"] = against_liger(dict(loss_type="vespo", beta=0.0, vespo_k_pos=1.5,
                                            vespo_lambda_pos=2.5, vespo_k_neg=2.0,
                                            vespo_lambda_neg=1.0), dict(items=40.0), 3)
    positional = (0.04, False, True, 2, 0.2, 0.28, "vespo", None, "token", 1.0, 1.05, 0.9, None,
                  True, 1.5, 2.5, 2.0, 1.0)
    runs = []
    for cls in (LigerFusedLinearGRPOLoss, FusedLinearGRPOLoss):
        runs.append(run_loss(cls(*positional), x, is_ratio=x["is_ratio"]))
    out["positional"] = {"loss": rel(runs[1][0], runs[0][0]), "d_hidden": rel(runs[1][1],
                                                                              runs[0][1])}
    gen = torch.Generator().manual_seed(4)
    ref_input, ref_weight = torch.randn(B, T, H, generator=gen), torch.randn(V, H, generator=gen)
    ref_bias = torch.randn(V, generator=gen)
    for name, extra in (("ref_input", dict(ref_input=ref_input, ref_weight=ref_weight,
                                           ref_bias=ref_bias)),
                        ("ref_weight_alone", dict(ref_weight=ref_weight, ref_bias=ref_bias,
                                                  ref_per_token_logps=x["ref"]))):
        results = []
        for cls in (LigerFusedLinearGRPOLoss, FusedLinearGRPOLoss):
            hidden = x["hidden"].clone().requires_grad_()
            loss, metrics = cls(compiled=False)(hidden, x["weight"], x["ids"], x["mask"],
                                                x["adv"], old_per_token_logps=x["old"], **extra)
            results.append((loss.detach(), torch.autograd.grad(loss, hidden)[0],
                            [float(m) for m in metrics]))
        (l0, g0, m0), (l1, g1, m1) = results
        out[name] = {"loss": rel(l1, l0), "d_hidden": rel(g1, g0), "metrics": m1,
                     "their_metrics": m0, "kl": m0[0]}
    return out


CHECKS = {"liger_sequence": liger_sequence, "liger_float_mask": liger_float_mask,
          "liger_no_reference": liger_no_reference, "trl_loss": trl_loss, "fp32_head": fp32_head,
          "moe": moe, "engine_trainer": engine_trainer,
          "liger_api": liger_api}


if __name__ == "__main__":
    # argv: CHECK or CHECK:ARG,ARG (each ARG a run of CHECK), all in this one process (importing
    # TRL is most of a run); prints {CHECK or CHECK:ARG: result}
    results = {}
    for arg in sys.argv[1:]:
        check, _, specs = arg.partition(":")
        for spec in specs.split(",") if specs else [None]:
            results[check if spec is None else f"{check}:{spec}"] = CHECKS[check](spec)
    print(json.dumps(results))

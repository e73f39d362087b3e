"""Run under TRL 1.x (its directory first on sys.path, see test_trl.py): our GRPO loss and trainer
against TRL's own on a tiny Qwen2 built here. Prints one JSON line of the errors measured."""
import inspect
import json
import sys
import tempfile

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

VOCAB, PROMPT, COMPLETION, ROWS = 48, 5, 7, 4


def signature_gaps(ours, theirs) -> list:
    """Where ``ours`` does not take ``theirs``' parameters (name, kind, default, in order; ours may
    add keyword-only ones after them)."""
    mine = list(inspect.signature(ours).parameters.values())
    gaps = [f"{theirs.__qualname__}: {p} != {q}" for p, q in
            zip(inspect.signature(theirs).parameters.values(), mine)
            if (p.name, p.kind, p.default) != (q.name, q.kind, q.default)]
    extra = mine[len(inspect.signature(theirs).parameters):]
    return gaps + [f"{ours.__qualname__}: extra {p} not keyword-only" for p in extra
                   if p.kind != p.KEYWORD_ONLY]


def tiny_qwen2_dir():
    """A tiny Qwen2 saved to a temporary directory (TRL loads the reference model from its path)."""
    path = tempfile.mkdtemp(prefix="tiny_qwen2_")
    tiny_qwen2().save_pretrained(path)
    return path


def tiny_qwen2():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      eos_token_id=1, pad_token_id=0, tie_word_embeddings=False)
    return transformers.Qwen2ForCausalLM(config).float()


def tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab.update({"<pad>": 0, "<eos>": 1})
    tok = Tokenizer(models.WordLevel({w: i for w, i in vocab.items() if w not in ("t0", "t1")},
                                     unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                pad_token="<pad>")


def reward(completions, **_):
    """A spread of rewards: the sum of the completion's token numbers, mod 7."""
    return [float(sum(int(w[1:]) for w in c.split() if w[1:].isdigit()) % 7) for c in completions]


def config(loss_type, out, **extra):
    """TRL's GRPOConfig of these runs (fp32 on the CPU, 2 steps, beta 0.04); extra overrides."""
    from trl import GRPOConfig
    options = dict(output_dir=out, per_device_train_batch_size=ROWS, num_generations=2,
                   max_completion_length=COMPLETION, loss_type=loss_type, beta=0.04,
                   num_iterations=2, max_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[],
                   save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, bf16=False,
                   model_init_kwargs={"dtype": torch.float32})
    return GRPOConfig(**{**options, **extra})


def dataset():
    import datasets
    return datasets.Dataset.from_list([{"prompt": " ".join(f"t{2 + (i * 7 + j) % 40}"
                                                           for j in range(PROMPT))}
                                       for i in range(8)])


def loss_errors(loss_type):
    """|ours - TRL's| of the loss and of every parameter's gradient, TRL's _compute_loss on
    made-up rollout inputs (ratio != 1, a ref model, padded completions)."""
    from trl import GRPOTrainer
    from fusedrl.kernels.integrations import FusedLinearGRPOLoss
    trainer = GRPOTrainer(model=tiny_qwen2_dir(), reward_funcs=reward, args=config(loss_type,
                          tempfile.mkdtemp()), train_dataset=dataset(), processing_class=tokenizer())
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1   # set by train(); this calls the loss alone
    gen = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(2, VOCAB, (ROWS, PROMPT), generator=gen)
    completion_ids = torch.randint(2, VOCAB, (ROWS, COMPLETION), generator=gen)
    completion_mask = torch.ones(ROWS, COMPLETION)
    completion_mask[0, 4:] = 0
    completion_mask[2, 2:] = 0
    logp = lambda: trainer._get_per_token_logps_and_entropies(          # noqa: E731
        model, torch.cat([prompt_ids, completion_ids], 1),
        torch.cat([torch.ones_like(prompt_ids), completion_mask.long()], 1), COMPLETION)[0]
    with torch.no_grad():
        base = logp()
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids),
                  completion_ids=completion_ids, completion_mask=completion_mask,
                  advantages=torch.randn(ROWS, generator=gen),
                  old_per_token_logps=base + 0.1 * torch.randn(base.shape, generator=gen),
                  ref_per_token_logps=base + 0.1 * torch.randn(base.shape, generator=gen),
                  num_items_in_batch=completion_mask.sum())
    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    their_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ids = torch.cat([prompt_ids, completion_ids], 1)
    hidden = model.model(input_ids=ids).last_hidden_state[:, PROMPT - 1:-1]
    fused = FusedLinearGRPOLoss(beta=0.04, loss_type=loss_type, max_completion_length=COMPLETION,
                                use_bias_correction_kl=trainer.args.use_bias_correction_kl)
    ours, metrics = fused(hidden, model.lm_head.weight, completion_ids, completion_mask,
                          inputs["advantages"], ref_per_token_logps=inputs["ref_per_token_logps"],
                          old_per_token_logps=inputs["old_per_token_logps"],
                          num_items_in_batch=inputs["num_items_in_batch"])
    ours.backward()
    grad_error = max((p.grad - g).abs().max().item() for p, g in zip(model.parameters(),
                                                                   their_grads))
    return {"loss": abs(ours.item() - theirs.item()), "grad": grad_error,
            "loss_value": theirs.item(), "grad_norm": max(g.abs().max().item()
                                                          for g in their_grads)}


def train_errors(loss_type):
    """TRL's GRPOTrainer and ours, 2 steps from the same weights and seed (the second step's
    ratio != 1: num_iterations=2 reuses the first step's completions): |loss| per step and the
    largest parameter difference after."""
    from trl import GRPOTrainer
    from fusedrl.kernels.integrations.trl import FusedGRPOTrainer
    path, start = tiny_qwen2_dir(), tiny_qwen2()
    runs = {}
    for name, cls in (("trl", GRPOTrainer), ("ours", FusedGRPOTrainer)):
        transformers.set_seed(0)
        trainer = cls(model=path, reward_funcs=reward, args=config(loss_type, tempfile.mkdtemp()),
                      train_dataset=dataset(), processing_class=tokenizer())
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[name] = (losses, [p.detach() for p in trainer.model.parameters()])
    (their_losses, theirs), (our_losses, ours) = runs["trl"], runs["ours"]
    return {"steps": len(our_losses), "losses": our_losses, "fallback": trainer._fallback,
            "kl": [h["kl"] for h in trainer.state.log_history if "kl" in h],
            "loss": max(abs(a - b) for a, b in zip(our_losses, their_losses)),
            "params": max((a - b).abs().max().item() for a, b in zip(ours, theirs)),
            "moved": max((a - b).abs().max().item() for a, b in zip(ours, start.parameters()))}


CHECKS = {"loss": loss_errors, "train": train_errors}


if __name__ == "__main__":
    # argv: groups "CHECK:LOSS_TYPE,LOSS_TYPE,..." (CHECK loss or train), all in this one process
    # (importing TRL is most of a run); prints {check: {loss_type: errors}}
    groups = [arg.split(":") for arg in sys.argv[1:]]
    print(json.dumps({check: {loss_type: CHECKS[check](loss_type) for loss_type in types.split(",")}
                      for check, types in groups}))

"""The router losses against transformers' load_balancing_loss_func and ST-MoE's z-loss by hand,
and the wrapper adding them to a stage's loss with their gradient reaching the router."""
import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from fusedrl.engine.config.moe import RouterLossConfig
from fusedrl.engine.model.moe import moe_blocks
from fusedrl.engine.train.router_losses import router_losses, with_router_losses
from fusedrl.engine.model.config import ModelConfig
from fusedrl.engine.model.causal_lm import CausalLM
from engine_testing import random_prompts
from moe_testing import make_moe_model


def test_losses_match_transformers_and_the_z_loss_formula():
    logits = [torch.randn(11, 8, dtype=torch.float64).float() for _ in range(3)]
    chosen = [torch.topk(torch.softmax(l, -1), 2, dim=-1).indices for l in logits]
    balance, z = router_losses(logits, chosen, 8)
    torch.testing.assert_close(balance, load_balancing_loss_func(tuple(logits), 8, 2), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(z, torch.cat(logits).logsumexp(-1).pow(2).mean(), atol=1e-6, rtol=1e-6)


def test_sigmoid_balance_loss_uses_the_normalized_scores():
    """Two tokens, two experts, top-1: token 0 takes expert 0, token 1 expert 1. Sigmoid scores
    s = sigmoid(z) normalized per token, P_e = mean_t s_te / sum_j s_tj; f_e = 1/2 each, so the loss
    is 2 * (P_0 / 2 + P_1 / 2) = P_0 + P_1 = 1 whatever the logits (DeepSeek-V3's form, batch-wide)."""
    logits = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    chosen = torch.tensor([[0], [1]])
    balance, _ = router_losses([logits], [chosen], 2, "sigmoid")
    torch.testing.assert_close(balance, torch.tensor(1.0))
    logits = torch.tensor([[3.0, -1.0], [2.0, 0.5]])  # both tokens on expert 0: 2 * P_0
    balance, _ = router_losses([logits], [torch.tensor([[0], [0]])], 2, "sigmoid")
    s = torch.sigmoid(logits)
    torch.testing.assert_close(balance, 2 * (s[:, 0] / s.sum(-1)).mean())
    assert not torch.allclose(balance, router_losses([logits], [torch.tensor([[0], [0]])], 2)[0])  # not softmax


def test_wrapper_adds_weighted_losses_and_trains_the_router():
    hf = make_moe_model("mixtral")
    model = CausalLM(ModelConfig.from_hf(hf.config))
    model.load_state_dict(hf.state_dict(), strict=False)  # same names in memory (transformers 5's)
    ids = torch.tensor(random_prompts([10], seed=1)[0])

    def stage_loss(model, batch, step_counts):
        return model.forward_packed(batch, [len(batch)]).sum() * 0, {}

    wrapped = with_router_losses(stage_loss, RouterLossConfig(router_aux_loss_coef=0.5, router_z_loss_coef=0.25),
                                 lambda batch, counts: 0.5)
    grads = []
    for checkpointing in (False, True):  # the router losses' backward through recomputed layers
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        loss, stats = wrapped(model, ids, {})
        torch.testing.assert_close(loss, 0.5 * (0.5 * stats["router_aux_loss"] / 0.5
                                                + 0.25 * stats["router_z_loss"] / 0.5))
        loss.backward()
        grads.append([block.gate.weight.grad.clone() for block in moe_blocks(model)])
    assert all(g.abs().sum() > 0 for g in grads[0])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)
    assert with_router_losses(stage_loss, RouterLossConfig(), lambda b, c: 1.0) is stage_loss


def test_negative_coefficient_is_refused():
    with pytest.raises(ValueError, match="moe.router_z_loss_coef must be a finite number >= 0, got -1"):
        RouterLossConfig(router_z_loss_coef=-1)

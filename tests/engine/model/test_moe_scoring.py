"""Sigmoid router scoring (config.json's `scoring_func`, DeepSeek's key): read from the file (absent:
softmax), anything else refused in one line; the MoE block with it (and with softmax scores) on the
Triton kernels against a float64 reference written densely here (every expert on every token, the top-k picked by mask):
values and gradients of the input, the router and the experts, odd token and expert counts (the
feature sizes are grouped_mm's whole 16 bytes), one token, none."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fusedrl.engine.model.hf_io import load_config
from fusedrl.engine.model.moe import SparseMoeBlock
from fusedrl.engine.model.moe_config import MoEConfig
from fusedrl.engine.model.primitives import FORWARD
from fusedrl.kernels import use_backend
from kernel_testing import DEVICE, check_against_float64, needs_triton
from moe_testing import make_moe_model

MOE = MoEConfig(num_experts=7, top_k=3, intermediate_size=12, sparse_layers=(0,), norm_topk_prob=True,
                fp32_weights=True, router_aux_loss_coef=0.0, legacy_names=("mlp", "gate_proj", "up_proj", "down_proj"),
                scoring_func="sigmoid")


def dense_reference(moe: MoEConfig):
    """(h [N, H], router [E, H], gate_up [E, 2I, H], down [E, H, I]) -> [N, H] in the inputs' dtype:
    sigmoid (or softmax) scores, the top k kept (renormalized when norm_topk_prob), every expert run
    on every token."""
    def block(h, router, gate_up, down):
        logits = h @ router.T  # [N, E]
        scores = torch.sigmoid(logits) if moe.scoring_func == "sigmoid" else logits.softmax(-1)
        keep = torch.zeros_like(scores).scatter_(1, torch.topk(scores, moe.top_k, dim=-1).indices, 1.0)
        weights = scores * keep
        if moe.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        gate, up = torch.einsum("nh,eih->nei", h, gate_up).chunk(2, dim=-1)  # [N, E, I] each
        out = torch.einsum("nei,ehi->neh", F.silu(gate) * up, down)  # [N, E, H]
        return torch.einsum("ne,neh->nh", weights, out)
    return block


def kernel_block(moe: MoEConfig, hidden: int):
    """The same inputs -> SparseMoeBlock's forward on the Triton kernels (moe_sort / permute /
    grouped_linear / weighted unpermute), its parameters the inputs."""
    def block(h, router, gate_up, down):
        module = SparseMoeBlock(moe, hidden, h.dtype, layer_idx=0)
        params = {"gate.weight": router, "experts.gate_up_proj": gate_up, "experts.down_proj": down}
        with use_backend("triton"):
            return torch.func.functional_call(module, params, (h, FORWARD))
    return block


def block_inputs(moe: MoEConfig, tokens: int, hidden: int, seed: int) -> tuple:
    """Random (h, router, gate_up, down) of the block's shapes on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    inputs = (torch.randn(tokens, hidden, generator=g), torch.randn(moe.num_experts, hidden, generator=g),
              0.3 * torch.randn(moe.num_experts, 2 * moe.intermediate_size, hidden, generator=g),
              0.3 * torch.randn(moe.num_experts, hidden, moe.intermediate_size, generator=g))
    return tuple(t.to(DEVICE) for t in inputs)


@needs_triton
@pytest.mark.parametrize("tokens,hidden,norm", [(13, 20, True), (1, 20, True), (0, 16, True), (9, 28, False)])
def test_sigmoid_block_matches_float64_reference(tokens, hidden, norm):
    moe = dataclasses.replace(MOE, norm_topk_prob=norm)
    check_against_float64(kernel_block(moe, hidden), dense_reference(moe),
                          block_inputs(moe, tokens, hidden, seed=tokens), (0, 1, 2, 3),
                          name=f"sigmoid moe block {tokens}x{hidden}")


@needs_triton
@pytest.mark.parametrize("tokens,hidden,norm", [(13, 20, True), (1, 20, True), (9, 28, False)])
def test_softmax_block_matches_float64_reference(tokens, hidden, norm):
    """Softmax scoring: renormalized over the k (Qwen3-MoE) the router takes a k-wide softmax of
    the top k logits, the same weights and gradients as the softmax over every expert renormalized;
    without it (Qwen2-MoE) the top-k softmax scores themselves."""
    moe = dataclasses.replace(MOE, norm_topk_prob=norm, scoring_func="softmax")
    check_against_float64(kernel_block(moe, hidden), dense_reference(moe),
                          block_inputs(moe, tokens, hidden, seed=100 + tokens), (0, 1, 2, 3),
                          name=f"softmax moe block {tokens}x{hidden}")


def test_replayed_experts_weigh_by_their_own_renormalized_softmax():
    """A replayed routing (rollout routing replay) weighs each token's recorded experts by the
    softmax over every expert renormalized over them, where the router would have chosen others."""
    from fusedrl.engine.model.moe import RoutingTrace
    moe = dataclasses.replace(MOE, num_experts=5, top_k=2, scoring_func="softmax")
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0], [0.0, 0.25, -4.0, 1.0, 2.0]])
    block = SparseMoeBlock(moe, 8, torch.float32, 0)
    block.trace = RoutingTrace(replay={0: torch.tensor([[1, 2], [-1, -1]])})  # row 1 routes itself
    ids, weights = block.route(logits)
    assert ids.tolist() == [[1, 2], [4, 3]]
    probs = logits.double().softmax(-1).gather(1, ids)
    torch.testing.assert_close(weights.double(), probs / probs.sum(-1, keepdim=True))


def test_sigmoid_weights_are_the_chosen_scores():
    """Sigmoid scores are not a distribution: without norm_topk_prob the weights are the top-k
    sigmoids themselves (they need not sum to 1); with it, those over their sum."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 0.25, -4.0, 1.0]])
    for norm in (False, True):
        block = SparseMoeBlock(dataclasses.replace(MOE, num_experts=4, top_k=2, norm_topk_prob=norm), 8,
                               torch.float32, 0)
        ids, weights = block.route(logits)
        assert ids.tolist() == [[3, 0], [3, 1]]
        expected = torch.sigmoid(torch.tensor([[3.0, 2.0], [1.0, 0.25]]))
        torch.testing.assert_close(weights, expected / expected.sum(-1, keepdim=True) if norm else expected)


def test_scoring_func_read_from_config_json_or_refused(tmp_path):
    for value, expected in ((None, "softmax"), ("sigmoid", "sigmoid"), ("softmax", "softmax")):
        extra = {} if value is None else {"scoring_func": value}
        make_moe_model("mixtral", **extra).config.save_pretrained(tmp_path / str(value))
        assert load_config(tmp_path / str(value)).moe.scoring_func == expected
    make_moe_model("qwen3_moe", scoring_func="sparsemax").config.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="config.json: scoring_func='sparsemax' is not supported "
                                         r"\(expected one of softmax, sigmoid\)") as err:
        load_config(tmp_path / "bad")
    assert "\n" not in str(err.value)

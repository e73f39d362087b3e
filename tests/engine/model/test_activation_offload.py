"""train.activation_offload: what checkpointed layers keep rests in CPU memory (copies, on the CPU a
copy within CPU memory) and comes back for the backward; the gradients are bit-identical."""
import pytest
import torch

from fusedrl.engine.config.train import RunConfig
from fusedrl.engine.model.activation_offload import ActivationOffload
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.stages.ppo.forwards import response_logprobs
from fusedrl.engine.stages.rollout.packs import pack_rollout
from engine_testing import random_prompts
from train_testing import save_tiny_model


def test_saved_tensors_are_copies_that_come_back():
    a, b = torch.randn(5, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    offload = ActivationOffload()
    with offload.hooks():
        y = (a * b).sum()  # saves a and b (leaves, not Parameters: copied)
    assert len(offload.saved) == 2 and offload.bytes_moved == 2 * 5 * 3 * 4
    originals = (a.data_ptr(), b.data_ptr())
    assert all(buffer.data_ptr() not in originals for buffer, _, _ in offload.saved)
    y.backward()
    assert torch.equal(a.grad, b.detach()) and torch.equal(b.grad, a.detach())


def test_parameters_stay_in_place():
    weight = torch.nn.Parameter(torch.randn(4, 4))
    offload = ActivationOffload()
    with offload.hooks():
        (torch.randn(2, 4) @ weight).sum().backward()
    assert offload.bytes_moved == 2 * 4 * 4  # the input, not the weight


@pytest.mark.parametrize("share_prompts", [False, True])
def test_offloaded_layers_give_bit_identical_gradients(tmp_path, share_prompts):
    model = load_model(save_tiny_model(tmp_path / "llama"))
    prompts = [p for p in random_prompts([6, 3]) for _ in range(2)]
    answers = random_prompts([4, 2, 5, 3], seed=1)
    packed = pack_rollout(prompts, answers, "cpu", share_prompts=share_prompts)

    def gradients(offload: bool):
        model.zero_grad()
        model.set_recompute(True, offload)
        logp = response_logprobs(model, packed, 1.0)[0]
        (logp * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}
    plain = gradients(False)
    assert model.offloaded_bytes == 0
    offloaded = gradients(True)
    assert all(torch.equal(offloaded[name], grad) for name, grad in plain.items())
    # Every layer's input, and past the first its residual stream: [N', hidden] fp32 each.
    layers, hidden = model.config.num_layers, model.config.hidden_size
    assert model.offloaded_bytes == (2 * layers - 1) * packed.forwarded_tokens * hidden * 4


def test_offload_needs_checkpointing():
    expected = "train.activation_offload=true .* set train.gradient_checkpointing=true"
    with pytest.raises(ValueError, match=expected):
        RunConfig(activation_offload=True, gradient_checkpointing=False)
    assert RunConfig(activation_offload=True).checkpointing()  # auto: on with the offload


def test_recompute_takes_a_resolved_bool(tmp_path):
    """An unresolved train.gradient_checkpointing=auto never reaches a model as truthy 'auto'."""
    model = load_model(save_tiny_model(tmp_path / "m"), dtype=torch.float32)
    with pytest.raises(TypeError, match="set_recompute: checkpointing='auto', expected a bool"):
        model.set_recompute("auto")

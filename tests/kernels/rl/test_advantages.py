"""gae (the Triton and CUDA scans) and masked_whiten against references and hand-worked cases."""
import pytest
import torch

from fusedrl.kernels import gae, masked_whiten, reference, use_backend
from kernel_testing import DEVICE, FUSED_BACKENDS, assert_close, needs_triton, rand_mask

pytestmark = needs_triton

# rewards [1, 0, 2], values [0.5, 1.0, 1.5], gamma 0.9, lam 0.5 (gamma * lam = 0.45):
#   t=2: delta = 2 + 0 - 1.5 = 0.5                    A = 0.5
#   t=1: delta = 0 + 0.9 * 1.5 - 1.0 = 0.35           A = 0.35 + 0.45 * 0.5 = 0.575
#   t=0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4            A = 1.4 + 0.45 * 0.575 = 1.65875
# With t=1 masked, t=0 bootstraps from t=2:
#   t=0: delta = 1 + 0.9 * 1.5 - 0.5 = 1.85           A = 1.85 + 0.45 * 0.5 = 2.075
# With t=2 masked, t=1 is the last step: A = 0 + 0 - 1.0 = -1.0, and t=0: A = 1.4 + 0.45 * -1.0.
HAND_CASES = [
    ([1, 1, 1], [1.65875, 0.575, 0.5]),
    ([1, 0, 1], [2.075, 0.0, 0.5]),
    ([0, 1, 1], [0.0, 0.575, 0.5]),   # left padding
    ([1, 1, 0], [0.95, -1.0, 0.0]),   # right padding
    ([0, 0, 0], [0.0, 0.0, 0.0]),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["torch"])
@pytest.mark.parametrize("mask, expected", HAND_CASES)
def test_hand_computed(mask, expected, backend):
    rewards = torch.tensor([[1.0, 0.0, 2.0]], device=DEVICE)
    values = torch.tensor([[0.5, 1.0, 1.5]], device=DEVICE)
    mask = torch.tensor([mask], device=DEVICE, dtype=torch.bool)
    with use_backend(backend):
        advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    expected = torch.tensor([expected], device=DEVICE)
    assert_close(advantages, expected, atol=1e-6, rtol=1e-6, name="advantages")
    assert_close(returns, torch.where(mask, expected + values, 0.0), atol=1e-6, rtol=1e-6, name="returns")


def gae_by_compaction(rewards, values, mask, gamma, lam):
    """Independent check of the skipping rule: squeeze out invalid steps, run the textbook
    recursion on what is left, scatter back."""
    advantages = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = mask[b].nonzero().flatten()
        r, v = rewards[b, idx].double(), values[b, idx].double()
        running = 0.0
        for i in reversed(range(len(idx))):
            next_value = v[i + 1] if i + 1 < len(idx) else 0.0
            running = r[i] + gamma * next_value - v[i] + gamma * lam * running
            advantages[b, idx[i]] = running
    return advantages


SHAPES = [(1, 1), (4, 1), (3, 7), (5, 64), (2, 2500)]
STEP_MAPS = [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.0, 0.7)]
# The 2500-step rows are there for the carry between the kernel's 1024-step blocks and fp32
# accumulation over a long row; with gamma * lam = 0 no step carries anything to the one before it,
# which the short rows show as well (a long row costs seconds in the interpreter).
CASES = [(shape, gamma, lam) for shape in SHAPES for gamma, lam in STEP_MAPS
         if shape[1] <= 64 or gamma * lam > 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, gamma, lam", CASES)
def test_matches_reference(shape, gamma, lam, dtype, fused_backend):
    rewards = torch.randn(shape, device=DEVICE).to(dtype)
    values = torch.randn(shape, device=DEVICE).to(dtype)
    mask = rand_mask(*shape)
    if shape[0] > 2:
        mask[0] = False                                   # a fully masked row
        mask[1, : shape[1] // 2] = False                  # left padding
    with use_backend(fused_backend):
        advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = reference.gae(rewards.double(), values.double(), mask, gamma=gamma, lam=lam)
    assert advantages.dtype == returns.dtype == torch.float32
    # fp32 accumulation over up to 2500 steps of O(1) terms: a small value late in a row is the
    # difference of running sums whose size is up to max|ref|, so the absolute error scales with it.
    scale = max(1.0, float(ref_ret.abs().max()), float(ref_adv.abs().max()))
    assert_close(advantages, ref_adv, atol=2e-5 * scale, rtol=2e-5, name="advantages")
    assert_close(returns, ref_ret, atol=2e-5 * scale, rtol=2e-5, name="returns")
    if shape[1] <= 64:
        assert_close(ref_adv, gae_by_compaction(rewards, values, mask, gamma, lam),
                     atol=1e-10, rtol=1e-10, name="reference vs compaction")


def test_all_valid_matches_trl_loop(fused_backend):
    rewards, values = torch.randn(3, 9, device=DEVICE), torch.randn(3, 9, device=DEVICE)
    last, steps = 0.0, []
    for t in reversed(range(9)):        # TRL's formulation, no mask
        next_values = values[:, t + 1] if t < 8 else 0.0
        last = rewards[:, t] + 0.97 * next_values - values[:, t] + 0.97 * 0.9 * last
        steps.append(last)
    expected = torch.stack(steps[::-1], dim=1)
    with use_backend(fused_backend):
        advantages, _ = gae(rewards, values, torch.ones(3, 9, dtype=torch.long, device=DEVICE),
                            gamma=0.97, lam=0.9)
    assert_close(advantages, expected, atol=1e-5, rtol=1e-5)


def test_masked_entries_are_never_read(fused_backend):
    rewards, values = torch.randn(2, 10, device=DEVICE), torch.randn(2, 10, device=DEVICE)
    mask = rand_mask(2, 10)
    with use_backend(fused_backend):
        clean = gae(rewards, values, mask)
        dirty = gae(rewards.masked_fill(~mask, float("nan")), values.masked_fill(~mask, float("inf")), mask)
    assert torch.equal(clean[0], dirty[0]) and torch.equal(clean[1], dirty[1])


def test_empty_and_no_grad(fused_backend):
    with use_backend(fused_backend):
        advantages, returns = gae(torch.zeros(0, 5, device=DEVICE), torch.zeros(0, 5, device=DEVICE),
                                  torch.zeros(0, 5, dtype=torch.bool, device=DEVICE))
        assert advantages.shape == returns.shape == (0, 5)
        values = torch.randn(2, 3, device=DEVICE, requires_grad=True)
        advantages, _ = gae(torch.randn(2, 3, device=DEVICE), values, rand_mask(2, 3))
    assert not advantages.requires_grad


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["torch"])
def test_no_time_steps_gives_empty_outputs(backend):
    empty = torch.zeros(2, 0, device=DEVICE)
    with use_backend(backend):
        advantages, returns = gae(empty, empty, torch.zeros(2, 0, dtype=torch.bool, device=DEVICE))
    assert advantages.shape == returns.shape == (2, 0) and advantages.dtype == returns.dtype == torch.float32


@pytest.mark.parametrize("bad, error, match", [
    (dict(values=torch.zeros(2, 4)), ValueError, r"values must have the shape of rewards \(2, 3\)"),
    (dict(mask=torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask must be bool, integer or float"),
    (dict(mask=torch.ones(3, 2, dtype=torch.bool)), ValueError, "mask must have the shape"),
    (dict(gamma=1.5), ValueError, r"gamma must be a number in \[0, 1\]"),
    (dict(lam=-0.1), ValueError, r"lam must be a number in \[0, 1\]"),
    (dict(rewards=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "rewards must have dtype"),
])
def test_gae_bad_input(bad, error, match):
    args = dict(rewards=torch.zeros(2, 3), values=torch.zeros(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(bad)
    args = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.raises(error, match=match):
        gae(args.pop("rewards"), args.pop("values"), args.pop("mask"), **args)


def test_whiten_normalizes_valid_entries():
    x = torch.randn(4, 50, device=DEVICE) * 3 + 5
    mask = rand_mask(4, 50)
    white = masked_whiten(x, mask)
    valid = white[mask].double()
    assert abs(valid.mean().item()) < 1e-5
    assert valid.std().item() == pytest.approx(1.0, abs=1e-5)   # unbiased, as in the definition
    assert torch.all(white[~mask] == 0)
    kept_mean = masked_whiten(x, mask, shift_mean=False)[mask].double()
    assert kept_mean.mean().item() == pytest.approx(x[mask].double().mean().item(), abs=1e-4)


def test_whiten_edge_cases():
    x = torch.randn(2, 3, device=DEVICE)
    one = torch.zeros(2, 3, dtype=torch.bool, device=DEVICE)
    one[0, 1] = True
    assert torch.all(masked_whiten(x, one) == 0)                 # a single entry is its own mean
    assert torch.all(masked_whiten(x, torch.zeros_like(one)) == 0)
    # a float mask (a host's) is nonzero = valid
    assert torch.equal(masked_whiten(x, one.float()), masked_whiten(x, one))

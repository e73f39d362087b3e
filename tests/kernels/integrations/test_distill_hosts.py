"""linear_distill_divergence at its hosts' call shapes, against the hosts' own code: TRL 1.x's
_chunked_divergence_loss and DistillationTrainer (FusedDistillationTrainer), Liger's
LigerFusedLinearJSD (FusedLinearJSD) and LigerFusedLinearJSDLoss (FusedLinearJSDLoss). TRL 1.x and Liger live in .ci-trl (see trl_testing.py),
put first on the path of one worker process; without them these tests skip and say so. Liger's
Triton kernels run in the interpreter there."""
import pytest

from trl_testing import needs_trl, run_worker

pytestmark = needs_trl


@pytest.fixture(scope="module")
def host_runs() -> dict:
    """Every check in one worker process: {check: {case: errors}}."""
    return run_worker("distill_worker.py", "trl_loss", "liger", "liger_loss", "trainer")


def test_trl_chunked_divergence_loss_shape(host_runs):
    """beta 0, 0.5, 1 x temperature 1, 0.7 x num_items_in_batch or not: 12 cases."""
    assert len(host_runs["trl_loss"]) == 12
    for case, errors in host_runs["trl_loss"].items():
        assert errors["loss_value"] > 0.1 and errors["n_valid"] == 0, (case, errors)
        assert errors["loss"] <= 1e-5 and errors["entropy"] <= 1e-5, (case, errors)
        assert errors["grad"] <= 1e-4, (case, errors)


def test_liger_fused_linear_jsd_shape_and_beta_convention(host_runs):
    """The same jsd_beta on both sides gives the same loss: Liger's convention is TRL's."""
    assert len(host_runs["liger"]) == 6
    for case, errors in host_runs["liger"].items():
        assert errors["loss_value"] > 0.1, (case, errors)
        assert errors["loss"] <= 1e-5 and errors["grad"] <= 1e-4, (case, errors)


def test_liger_jsd_loss_constructor_and_forward_are_taken_whole(host_runs):
    """LigerFusedLinearJSDLoss and LigerFusedLinearJSD 0.8.5's parameters (names, positions,
    defaults) are ours; built from the same arguments, by position or keyword, ours gives
    Liger's loss (its half cross-entropy by default), soft and hard terms, and gradients (the
    student's bias included), a teacher's head padded past the student's vocabulary too."""
    result = dict(host_runs["liger_loss"])
    assert result.pop("signature_gaps") == []
    assert set(result) == {"default", "positional", "hard_only", "biases", "padded_teacher",
                           "soft_hard"}
    assert result["soft_hard"]["outputs"] == 3
    for case, errors in result.items():
        assert errors["loss_value"] > 0.1, (case, errors)
        assert errors["loss"] <= 1e-5 and errors["grad"] <= 1e-5, (case, errors)


def test_fused_distillation_trainer_loss_equals_trls(host_runs):
    assert set(host_runs["trainer"]) == {"beta=0.0", "beta=0.5", "beta=1.0"}
    for case, errors in host_runs["trainer"].items():
        assert errors["loss_value"] > 1e-3, (case, errors)
        assert errors["loss"] <= 1e-6 and errors["entropy"] <= 1e-6, (case, errors)
        assert errors["grad"] <= 1e-4, (case, errors)

"""FusedLinearGRPOLoss and FusedGRPOTrainer against TRL 1.x's own GRPO loss and trainer, on a tiny
Qwen2 built in code, in a worker process with TRL 1.x first on its path (trl_testing.py)."""
import pytest

from trl_testing import needs_trl, run_worker

pytestmark = needs_trl


@pytest.fixture(scope="module")
def trl_runs() -> dict:
    """Both checks in one worker process (TRL's import is most of its time):
    {"loss" | "train": {loss_type: errors}}."""
    return run_worker("trl_worker.py", "loss:grpo,dr_grpo,dapo,bnpo", "train:grpo,dr_grpo,dapo")


def test_grpo_loss_equals_trls_for_each_loss_type(trl_runs):
    """TRL's _compute_loss (its fused head, KL with use_bias_correction_kl, its normalizers) on
    padded completions with ratio != 1, against ours from the same model's hidden states."""
    assert set(trl_runs["loss"]) == {"grpo", "dr_grpo", "dapo", "bnpo"}
    for loss_type, errors in trl_runs["loss"].items():
        assert abs(errors["loss_value"]) > 0.1 and errors["grad_norm"] > 0.01, loss_type
        assert errors["loss"] <= 1e-5, (loss_type, errors)
        assert errors["grad"] <= 1e-4, (loss_type, errors)


def test_fused_trainer_trains_like_trls(trl_runs):
    """Two steps each way from the same weights and seed: the second's ratio != 1 and beta > 0."""
    assert set(trl_runs["train"]) == {"grpo", "dr_grpo", "dapo"}
    for loss_type, run in trl_runs["train"].items():
        assert run["fallback"] == [] and run["steps"] == 2, (loss_type, run)
        assert run["moved"] > 1e-3 and abs(run["losses"][1]) > 1e-3 and run["kl"][1] > 0
        assert run["loss"] <= 1e-5, (loss_type, run)
        assert run["params"] <= 1e-4, (loss_type, run)

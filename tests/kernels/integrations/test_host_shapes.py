"""Our GRPO loss and FusedGRPOTrainer at the shapes TRL 1.x and Liger call them with, side by side
with their own code on the same inputs (host_shapes_worker.py, in one process with TRL and Liger
first on its path, trl_testing.py): GSPO's sequence ratio differentiated through the sequence mean
with per-token IS ratios and advantages, float masks as weights, beta without a reference, the
fp32 head cast under bf16 autocast, a Qwen3-MoE in the drop-in trainer, TRL's metric names."""
import pytest

from trl_testing import needs_trl, run_worker

pytestmark = needs_trl

TRL_LOSSES = "grpo/sequence,bnpo/token,cispo/token,sapo/token,grpo/sequence/binary"


@pytest.fixture(scope="module")
def runs() -> dict:
    return run_worker("host_shapes_worker.py", "liger_sequence", "liger_float_mask",
                      "liger_no_reference", f"trl_loss:{TRL_LOSSES}", "fp32_head", "moe",
                      "engine_trainer", "liger_api")


def assert_matches_liger(case, name):
    """Loss and gradients within 1e-5 relative of Liger's, Liger's metrics list to 1e-6."""
    assert case["grad_norm"] > 1e-3, name
    assert case["loss"] <= 1e-5 and case["d_hidden"] <= 1e-5 and case["d_weight"] <= 1e-5, \
        (name, case)
    assert case["metrics"] == pytest.approx(case["their_metrics"], abs=1e-6), (name, case)


def test_sequence_level_gradients_are_liger_s(runs):
    """GSPO with a [B, T] and a [B, 1] sampler IS ratio, float and binary masks: each token's
    gradient goes through the sequence's mean log-ratio, as Liger differentiates it."""
    cases = runs["liger_sequence"]
    assert len(cases) == 4
    for name, case in cases.items():
        assert_matches_liger(case, name)


def test_float_masks_weigh_tokens_as_liger_does(runs):
    """Every loss type with a mask of weights in (0, 1] (an empty row, holes): loss, gradients
    and the [kl, clip] metrics are Liger's; binary_mask=True reads every nonzero as 1."""
    cases = runs["liger_float_mask"]
    binary = cases.pop("binary_mask")
    for name, case in cases.items():
        assert_matches_liger(case, name)
    assert cases["grpo"]["metrics"][1] > 0           # the clip metric is exercised
    assert binary["as_ones"] == 0.0 and binary["weighted"] > 1e-3


def test_beta_without_a_reference_is_refused_or_zero_as_liger_s(runs):
    result = runs["liger_no_reference"]
    assert result["refused"]["liger"].startswith("AssertionError")
    message = result["refused"]["ours"]
    assert message.startswith("ValueError") and "ref_per_token_logps" in message
    assert "\n" not in message and "beta=0.04" in message
    for name in ("no_ref", "no_ref_given", "no_beta"):
        assert_matches_liger(result[name], name)
    assert result["no_ref"]["metrics"][0] == 0.0 and len(result["no_ref"]["metrics"]) == 2
    assert len(result["no_beta"]["metrics"]) == 1


@pytest.mark.parametrize("spec", TRL_LOSSES.split(","))
def test_trainer_loss_gradients_and_metrics_are_trl_s(runs, spec):
    """TRL's _compute_loss and our trainer's on the same rollout: a float completion mask and
    [B, T] advantages (binary: a 0/1 mask and [B]), old and reference log-probs; the metrics by
    TRL's names and values."""
    case = runs[f"trl_loss:{spec}"]
    assert case["fallback"] == [] and abs(case["loss_value"]) > 1e-2, case
    assert case["loss"] <= 1e-6 and case["grad"] <= 1e-5, case
    assert set(case["metrics"]) == set(case["their_metrics"]), case
    for name, value in case["their_metrics"].items():
        assert case["metrics"][name] == pytest.approx(value, abs=1e-6), (name, case)


def test_fp32_head_cast_under_bf16_autocast(runs):
    """cast_lm_head_to_fp32=True with bf16=True: the head runs in fp32 in ours as in TRL's."""
    result = runs["fp32_head"]
    assert result["ours"]["head_dtype"] == result["trl"]["head_dtype"] == "torch.float32"
    assert result["ours_vs_trl"] <= 1e-6
    assert result["ours"]["error"] <= 2 * result["trl"]["error"] + 1e-6


def test_qwen3_moe_trains_in_the_drop_in_trainer(runs):
    """A tiny Qwen3-MoE: the load-balancing loss is kept (loss, gradients, the aux_loss metric
    equal TRL's), and two training steps match TRL's trainer."""
    result = runs["moe"]
    assert result["fallback"] == [] and result["metrics"]["aux_loss"] > 0
    assert result["loss"] <= 1e-6 and result["grad"] <= 1e-5, result
    assert result["metrics"] == pytest.approx(result["their_metrics"], abs=1e-6)
    assert result["train_losses"] == pytest.approx(result["their_train_losses"], abs=1e-6)
    assert result["aux"] == pytest.approx(result["their_aux"], abs=1e-6)
    assert result["params"] <= 1e-4


def test_trl_s_configs_are_translated_field_by_field_in_the_engine_trainers(runs):
    """Every field of TRL 1.16's GRPOConfig and DistillationConfig is translated to our options
    or, once set, refused in a line of its own (the vLLM fields inert without use_vllm); TRL's
    defaults translate (its learning rate and completion length become ours); set values reach
    their options; a DistillationConfig in the GRPO trainer is refused naming the right one."""
    result = runs["engine_trainer"]
    for name, translated in (("GRPOConfig", 45), ("DistillationConfig", 32)):
        case = result[name]
        walked = case["walked"]
        assert set(walked.values()) == {"translated", "refused", "inert"}, \
            {field: outcome for field, outcome in walked.items()
             if outcome not in ("translated", "refused", "inert")}
        assert list(walked.values()).count("translated") == translated, name
        assert all(walked[field] == "inert" for field in walked if field.startswith("vllm_"))
        assert case["unknown_keys"] == [] and case["lr"] == 1e-6, case
        assert case["max_new_tokens"] == 512 and case["device"] == "cpu", case
    assert result["grpo_set"] == {
        "lr": 3e-5, "kl_loss_coef": 0.02, "clip_eps_high": 0.28, "agg": "seq-mean-token-sum-norm",
        "loss_agg_norm": 48.0, "samples_per_prompt": 4, "prompts_per_iteration": 4,
        "minibatch_size": 8, "ratio_level": "sequence", "estimator": "dr_grpo", "temperature": 0.9,
        "iterations": 7, "precision": "fp32"}
    assert result["distill_set"] == {"beta": 0.5, "temperature": 0.8, "rollout_temperature": 0.8,
                                     "teacher": "teacher-dir"}
    lines = result["refusals"].splitlines()
    assert lines[0] == "ConfigError: args: TRL's GRPOConfig fields fusedrl cannot take (3):"
    assert sorted(line.split("=")[0].strip() for line in lines[1:]) == [
        "loss_type", "lr_scheduler_type", "use_vllm"]
    assert result["wrong_trainer"].startswith("ConfigError: args: TRL's DistillationConfig "
                                              "configures fusedrl.engine's DistillTrainer")


def test_liger_grpo_constructor_and_forward_are_taken_whole(runs):
    """LigerFusedLinearGRPOLoss 0.8.5's parameters (names, positions, defaults) are ours; luspo,
    vespo (its four shapes given by position), the reference as ref_input through ref_weight,
    and ref_weight / ref_bias without ref_input (not read, as Liger) give Liger's values."""
    result = runs["liger_api"]
    assert result.pop("signature_gaps") == []
    positional = result.pop("positional")
    assert positional["loss"] <= 1e-5 and positional["d_hidden"] <= 1e-5, positional
    for name in ("ref_input", "ref_weight_alone"):
        case = result.pop(name)
        assert case["kl"] > 1e-3 and case["loss"] <= 1e-5 and case["d_hidden"] <= 1e-5, case
        assert case["metrics"] == pytest.approx(case["their_metrics"], abs=1e-6), (name, case)
    assert set(result) == {"luspo/sequence", "luspo/token_ones", "vespo/float_mask",
                           "vespo/items"}
    for name, case in result.items():
        assert_matches_liger(case, name)

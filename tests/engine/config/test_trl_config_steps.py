"""TRL's GRPOConfig counts max_steps, warmup_steps, logging_steps and save_steps in optimizer
steps; ours counts iterations (one generation batch and its epochs). A run translated from TRL
takes as many optimizer steps as TRL's would: num_iterations reuses of a batch and
steps_per_generation / gradient_accumulation_steps optimizer steps per reuse divide each count
(a length that is not a whole number of iterations is refused; a cadence is rounded up)."""
import pytest

from fusedrl.engine.config.io import ConfigError
from fusedrl.engine.config.trl_config import translate

trl = pytest.importorskip("trl")


def grpo(tmp_path, **fields):
    return trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **fields)


def optimizer_steps(options: dict) -> int:
    """Our run's optimizer steps: iterations x epochs x minibatches of a generation batch."""
    rows = options["rollout"]["prompts_per_iteration"] * options["rollout"]["samples_per_prompt"]
    minibatches = -(-rows // options["ppo"]["minibatch_size"])
    return options["train"]["iterations"] * options["ppo"]["epochs"] * minibatches


@pytest.mark.parametrize("fields, iterations", [
    ({"num_generations": 4}, 12),
    ({"num_iterations": 2, "num_generations": 4}, 6),
    ({"gradient_accumulation_steps": 2, "steps_per_generation": 6, "num_generations": 4}, 4),
    ({"num_iterations": 3, "steps_per_generation": 2, "num_generations": 4}, 2)])
def test_trl_s_optimizer_steps_are_our_iterations_times_their_steps(tmp_path, fields, iterations):
    options = translate(grpo(tmp_path, max_steps=12, per_device_train_batch_size=4, **fields),
                        "GRPOConfig")
    assert options["train"]["iterations"] == iterations
    assert optimizer_steps(options) == 12


def test_warmup_logging_and_saving_are_counted_in_iterations(tmp_path):
    options = translate(grpo(tmp_path, max_steps=40, num_iterations=4, warmup_steps=8,
                             per_device_train_batch_size=8,
                             logging_steps=10, save_steps=6), "GRPOConfig")
    assert options["optim"]["warmup_steps"] == 2
    assert (options["train"]["log_every"], options["train"]["save_every"]) == (3, 2)


def test_a_length_between_iterations_is_refused_in_one_line(tmp_path):
    config = grpo(tmp_path, max_steps=7, num_iterations=2, gradient_accumulation_steps=2,
                  steps_per_generation=3, per_device_train_batch_size=2, num_generations=2)
    with pytest.raises(ConfigError) as error:
        translate(config, "GRPOConfig")
    assert str(error.value).splitlines()[1:] == [
        "  max_steps=7: TRL counts optimizer steps; one fusedrl iteration takes 2 of them here "
        "(num_iterations x steps_per_generation / gradient_accumulation_steps): give a multiple "
        "of 2",
        "  steps_per_generation=3: a generation batch would end inside an optimizer step: ours "
        "takes a multiple of gradient_accumulation_steps (2)"]

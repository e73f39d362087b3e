"""data.tokens_per_microbatch: a step's examples packed into forwards of at most a token budget give
the step's gradient, the same as one forward per row, for SFT and for the reward model (pairwise and
K-way rankings): the losses are divided by the step's counts, never by a forward's."""
import pytest
import torch

from fusedrl.engine.data.tokenization import TokenizedExample
from fusedrl.engine.errors import ConfigValueError
from fusedrl.engine.model.hf_io import load_model
from fusedrl.engine.model.reward_model import reward_model_from_lm
from fusedrl.engine.stages.rm import rm_stage
from fusedrl.engine.stages.sft import sft_stage
from fusedrl.engine.train.optim import build_optimizer, build_scheduler
from fusedrl.engine.train.supervised import step_forwards, train_step
from engine_testing import random_prompts
from train_testing import rm_config, save_tiny_model, sft_config

CPU = torch.device("cpu")
# No clipping: the gradients compared are the accumulated ones, as the backward passes left them.
OPTIM = {"max_grad_norm": 0.0}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("token_budget_base"), "qwen2")


def sft_examples():
    """Eight demonstrations of 3 to 13 tokens, the prompt the first half."""
    lengths = [7, 3, 13, 5, 9, 4, 11, 6]
    return [TokenizedExample(p[:len(p) // 2], (p[len(p) // 2:],)) for p in random_prompts(lengths, seed=3)]


def rm_examples(k):
    """Seven rankings of k responses each, best first, responses of different lengths."""
    prompts = random_prompts([4, 2, 6, 3, 5, 1, 7], seed=4)
    responses = random_prompts([2 + (i % 5) for i in range(7 * k)], seed=5)
    return [TokenizedExample(p, tuple(responses[e * k:(e + 1) * k])) for e, p in enumerate(prompts)]


def step_gradients(model, stage, forwards, cfg, most_forwards=None):
    """The accumulated gradient of one train_step over `forwards`, and its metrics."""
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    metrics = train_step(model, stage, forwards, optimizer, scheduler, cfg, CPU, most_forwards)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, metrics


def assert_budget_gives_the_row_count_gradient(make_model, stage, examples, cfg, loss_key):
    # The step's data: three micro-batches of tokens_per_batch (rows 0-2, 3-4, 5-).
    groups = [examples[:3], examples[3:5], examples[5:]]
    per_row = step_forwards(stage, [[ex] for ex in examples], None)            # one forward per row
    expected, expected_metrics = step_gradients(make_model(), stage, per_row, cfg)
    longest, total = max(ex.num_tokens for ex in examples), sum(ex.num_tokens for ex in examples)
    for budget in (longest, 2 * longest + 1, total):
        forwards = step_forwards(stage, groups, budget)
        sizes = [len(f.input_ids) for f in forwards]
        assert max(sizes) <= budget and sum(sizes) == total
        assert all(size + longest > budget for size in sizes[:-1])  # full: the next example did not fit
        got, metrics = step_gradients(make_model(), stage, forwards, cfg)
        assert got.keys() == expected.keys() and len(got) > 2
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-4, msg=f"{name}, budget {budget}")
        assert metrics[loss_key] == pytest.approx(expected_metrics[loss_key], rel=1e-5)
    assert len(step_forwards(stage, groups, total)) == 1                          # the whole step, one forward
    assert len(step_forwards(stage, groups, None)) == len(groups)                 # unset: the data's micro-batches


def test_sft_token_budget_keeps_the_step_gradient(base_dir, tmp_path):
    cfg = sft_config(base_dir, "unused.jsonl", tmp_path, optim=OPTIM)
    stage = sft_stage("float32", CPU)
    assert_budget_gives_the_row_count_gradient(lambda: load_model(base_dir), stage, sft_examples(), cfg, "loss")


@pytest.mark.parametrize("k", [2, 3], ids=["pairwise", "3-way"])
def test_rm_token_budget_keeps_the_step_gradient(base_dir, tmp_path, k):
    cfg = rm_config(base_dir, "unused.jsonl", tmp_path, optim=OPTIM, beta_rm=0.5)

    def make_model():
        model = reward_model_from_lm(load_model(base_dir))
        torch.nn.init.normal_(model.score.weight, std=0.5, generator=torch.Generator().manual_seed(0))
        return model  # a random head, so the ranking loss reaches the trunk (a zero one sends it nothing)

    stage = rm_stage(cfg, torch.float32, CPU)
    assert_budget_gives_the_row_count_gradient(make_model, stage, rm_examples(k), cfg, "rank_loss")


def test_an_example_over_the_budget_names_the_option(base_dir, tmp_path):
    stage = sft_stage("float32", CPU)
    examples = sft_examples()
    with pytest.raises(ConfigValueError, match="does not fit in tokens_per_microbatch=5; raise data.tokens_per_microbatch"):
        step_forwards(stage, [examples], 5)


def test_a_rank_with_fewer_forwards_matches_the_others_without_changing_the_step(base_dir, tmp_path, monkeypatch):
    # Under FSDP every forward is a collective: a rank whose examples the budget cut into fewer
    # forwards than another rank's runs extra ones (loss times 0) so that none waits forever.
    cfg = sft_config(base_dir, "unused.jsonl", tmp_path, optim=OPTIM)
    stage = sft_stage("float32", CPU)
    forwards = step_forwards(stage, [sft_examples()], 20)
    expected, expected_metrics = step_gradients(load_model(base_dir), stage, forwards, cfg)
    calls = []
    loss = stage.loss
    monkeypatch.setattr(stage, "loss", lambda *args: calls.append(len(args[1].input_ids)) or loss(*args))
    got, metrics = step_gradients(load_model(base_dir), stage, forwards, cfg, len(forwards) + 2)  # another rank: 2 more
    smallest = min(len(f.input_ids) for f in forwards)
    assert calls == [len(f.input_ids) for f in forwards] + [smallest, smallest]
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], atol=0.0, rtol=0.0, msg=name)
    assert metrics == expected_metrics

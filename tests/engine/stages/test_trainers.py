"""The trainer objects (TRL's shape) on a tiny Qwen2 built in code: GRPOTrainer trains an in-memory
transformers model (the model holds the trained weights afterwards) and calls its callbacks
every step; a callback stops a run; a transformers TrainerCallback works as one; SFTTrainer takes a
model directory; bad arguments are exceptions naming them."""
import datasets
import pytest
import torch
import transformers

from fusedrl.engine import Callback, GRPOConfig, GRPOTrainer, SFTTrainer, UsageError
from fusedrl.engine.train.runlog import read_metrics
from engine_testing import make_chat_tokenizer, make_hf_model

PROMPTS = ["hello world", "the quick brown fox", "over the lazy dog", "jumps over"]
GRPO = {"rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": 4,
                    "kv_cache_memory": 1 << 22, "max_prompt_length": 24},
        "ppo": {"minibatch_size": 4}, "reward": {"isolation": "thread"},
        "optim": {"lr": 1e-2}, "train": {"iterations": 2, "progress": False, "device": "cpu"}}


def vowels(prompts, responses):
    return [sum(c in "aeiou" for c in r) / max(len(r), 1) for r in responses]


def prompts():
    return datasets.Dataset.from_list([{"prompt": p} for p in PROMPTS])


class Recorder(Callback):
    def __init__(self, stop_at=None):
        self.steps, self.logs, self.saves, self.stop_at = [], [], [], stop_at

    def on_step(self, step, metrics):
        self.steps.append(step)
        return step == self.stop_at

    def on_log(self, step, metrics):
        self.logs.append(step)

    def on_save(self, step, checkpoint):
        self.saves.append((step, checkpoint.is_dir()))


def test_grpo_trains_an_in_memory_model_and_calls_back_every_step(tmp_path):
    model = make_hf_model("qwen2")
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    class Duck:  # Callback's methods, not a subclass
        steps = []

        def on_step(self, step, metrics):
            self.steps.append(step)

    recorder, plain = Recorder(), []
    args = GRPOConfig.from_dict({**GRPO, "output_dir": str(tmp_path / "g")})  # no policy: model=
    trainer = GRPOTrainer(model=model, processing_class=make_chat_tokenizer(),
                          reward_funcs=vowels, args=args,
                          train_dataset=prompts(),
                          callbacks=[recorder, lambda step, metrics: plain.append(step), Duck()])
    result = trainer.train()
    assert recorder.steps == plain == Duck.steps == [1, 2] and recorder.logs == [1, 2]
    assert recorder.saves == [(2, True)]
    assert result.metrics["step"] == 2 and (result.final_dir / "config.json").is_file()
    changed = [name for name, p in model.state_dict().items() if not torch.equal(p, before[name])]
    assert changed, "the in-memory model did not receive the trained weights"
    assert_holds_exported(model, result.final_dir)


def assert_holds_exported(model, final_dir):
    exported = transformers.AutoModelForCausalLM.from_pretrained(final_dir)
    for name, p in exported.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], p.to(model.dtype), msg=name)


def test_a_callback_stops_the_run_with_a_checkpoint_and_the_model_exported(tmp_path):
    recorder = Recorder(stop_at=1)
    model = make_hf_model("qwen2", tie_word_embeddings=False)
    result = GRPOTrainer(model=model, processing_class=make_chat_tokenizer(),
                         reward_funcs=vowels, args={**GRPO, "output_dir": str(tmp_path / "g")},
                         train_dataset=prompts(), callbacks=[recorder]).train()
    assert recorder.steps == [1] and recorder.saves == [(1, True)]
    assert (result.final_dir / "config.json").is_file()
    info = [r for r in read_metrics(tmp_path / "g") if r["kind"] == "info" and "stopped" in r]
    assert info[-1]["stopped"] == "by a callback"
    assert_holds_exported(model, result.final_dir)


def test_sft_from_a_directory_with_a_transformers_callback(tmp_path):
    directory = tmp_path / "model"
    make_hf_model("qwen2").save_pretrained(directory)
    make_chat_tokenizer().save_pretrained(directory)

    class StopAtTwo(transformers.TrainerCallback):
        seen, evaluated = [], []

        def on_step_end(self, args, state, control, **kwargs):
            self.seen.append((state.global_step, state.max_steps, type(args).__name__))

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.evaluated.append((state.global_step, "loss" in metrics))
            control.should_training_stop = state.global_step == 2

    rows = [{"prompt": p, "completion": " hello"} for p in PROMPTS]
    config = {"output_dir": str(tmp_path / "sft"),
              "data": {"max_length": 48, "max_prompt_length": 24},
              "train": {"max_steps": 4, "eval_every": 1, "progress": False, "device": "cpu"}}
    result = SFTTrainer(model=str(directory), args=config,
                        train_dataset=datasets.Dataset.from_list(rows[:3]),
                        eval_dataset=datasets.Dataset.from_list(rows[3:]),
                        callbacks=[StopAtTwo()]).train()
    assert StopAtTwo.seen == [(1, 4, "SFTConfig"), (2, 4, "SFTConfig")]
    assert StopAtTwo.evaluated == [(1, True), (2, True)] and result.metrics["step"] == 2


def test_bad_arguments_are_exceptions_naming_them(tmp_path):
    args = {**GRPO, "output_dir": str(tmp_path / "g")}
    with pytest.raises(UsageError, match="processing_class: an in-memory model"):
        GRPOTrainer(model=make_hf_model("qwen2"), reward_funcs=vowels, args=args,
                    train_dataset=prompts()).train()
    with pytest.raises(UsageError, match="callbacks: 3 is not a callback"):
        GRPOTrainer(model=str(tmp_path), reward_funcs=vowels, args=args, callbacks=[3])
    with pytest.raises(UsageError, match="model: expected a model directory"):
        GRPOTrainer(model=3, args=args)
    with pytest.raises(UsageError, match="policy is required .*, or pass model="):
        GRPOTrainer(args=args, train_dataset=prompts()).train()
    # a list whose prompt column mixes strings and message lists makes no table
    mixed = [{"prompt": "a"}, {"prompt": [{"role": "user", "content": "b"}]}]
    with pytest.raises(UsageError, match="train_dataset: its rows do not make one table: .*every "
                                         "prompt a string, or every prompt a list of messages"):
        GRPOTrainer(model=str(tmp_path), reward_funcs=vowels, args=args, train_dataset=mixed)


def word_level_tokenizer():
    """A word-level tokenizer as TRL users build one (tokenizers' WordLevel in
    PreTrainedTokenizerFast): transformers reads it back from a Qwen2 directory as a byte-level
    BPE that encodes nothing."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 300)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                                pad_token="<pad>")


def test_a_trl_user_s_list_of_dicts_and_word_level_tokenizer_train(tmp_path):
    """TRL's train_dataset shape (a plain list of {"prompt": ...}) and a tokenizer transformers
    loads: the run reads the prompts through the given tokenizer's vocabulary and trains."""
    rows = [{"prompt": "w3 w4 w5 w6"}, {"prompt": "w7 w8"}, {"prompt": "w9 w10 w11"}]
    seen = []

    def lengths(prompts, responses):
        seen.extend(prompts)
        return [float(len(r.split())) for r in responses]
    args = {**GRPO, "output_dir": str(tmp_path / "g"), "train": {**GRPO["train"], "iterations": 1}}
    result = GRPOTrainer(model=make_hf_model("qwen2"), processing_class=word_level_tokenizer(),
                         reward_funcs=lengths, args=args, train_dataset=rows).train()
    assert result.metrics["step"] == 1
    assert seen and set(seen) <= {r["prompt"] for r in rows}


def test_trl_s_config_is_translated_and_a_bad_dataset_is_one_line(tmp_path):
    """TRL's GRPOConfig (the installed TRL's; TRL 1.16's every field: test_host_shapes.py) is
    translated, its learning rate ours; a field without a translation is refused once set."""
    trl = pytest.importorskip("trl")
    theirs = trl.GRPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True,
                            bf16=False, learning_rate=2e-5)
    args = GRPOTrainer(model=str(tmp_path), reward_funcs=vowels, args=theirs).args
    assert args.optim.lr == 2e-5 and args.train.precision == "fp32"
    theirs.lr_scheduler_type = "cosine"
    with pytest.raises(ValueError) as error:
        GRPOTrainer(model=str(tmp_path), reward_funcs=vowels, args=theirs)
    assert str(error.value).splitlines()[1:] == [
        "  lr_scheduler_type='cosine': no fusedrl option (TRL's default 'linear' is the only "
        "value taken)"]
    with pytest.raises(ValueError, match="args: expected fusedrl.engine.GRPOConfig .*, got "
                                         "builtins.int"):
        GRPOTrainer(model=str(tmp_path), reward_funcs=vowels, args=3)
    for bad, what in (([], "a list of 0 rows"), (["hello"], "a list of 1 rows"), (3, "int")):
        with pytest.raises(UsageError, match=f"train_dataset: expected a datasets.Dataset or a "
                                             f"non-empty list of row dicts, got {what}"):
            GRPOTrainer(model=str(tmp_path), args={**GRPO, "output_dir": str(tmp_path / "g")},
                        train_dataset=bad)

"""Shared helpers for the engine tests: tiny random Hugging Face models of each supported architecture.

Shapes are deliberately small (hidden 64, 2 layers, vocab 300) so the whole folder runs in well
under a minute on two CPU cores, yet exercise GQA (4 query heads over 2 KV heads).

transformers is imported where a model or a tokenizer is made, not with this module: a torchrun
rank or a `fusedrl` process imports a test module for its reward function (and, with it, these
helpers), and the engine it runs imports no transformers; the import would add about 3 s of CPU to
each of those processes.
"""
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB = 300
MAX_POS = 128
EOS = 5
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=MAX_POS,
            bos_token_id=1, eos_token_id=EOS, pad_token_id=0)

# arch -> (transformers' config class, its causal-LM class, config overrides), by name (above).
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
}


def hf_class(name: str):
    """transformers' class `name`, transformers imported on first use (see above)."""
    import transformers

    return getattr(transformers, name)


def make_hf_model(arch: str, seed: int = 0, **overrides):
    config_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(seed)
    config = hf_class(config_name)(**{**BASE, **extra, **overrides})
    model = hf_class(model_name)(config).eval()
    # Random init with std 0.02 gives near-uniform next-token distributions, where greedy ties are
    # decided by rounding; larger weights make the argmax well separated so parity is meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model


def saved_models(tmp_path_factory, archs, make) -> dict:
    """arch -> (directory, transformers model make(arch)) saved with the test tokenizer, per arch."""
    dirs = {}
    for arch in archs:
        path = tmp_path_factory.mktemp(arch)
        model = make(arch)
        model.save_pretrained(path)
        make_tokenizer().save_pretrained(path)
        dirs[arch] = (path, model)
    return dirs


def make_tokenizer():
    """A byte-level BPE (the Llama 3 / Qwen kind) with VOCAB ids, trained here on a toy corpus:
    <pad>=0, <s>=1, </s>=EOS. transformers' AutoTokenizer loads it for every architecture above."""
    special = ["<pad>", "<s>", "<|r2|>", "<|r3|>", "<|r4|>", "</s>"]
    assert special.index("</s>") == EOS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB
    return hf_class("PreTrainedTokenizerFast")(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


# A Qwen-style chat template over the test tokenizer's special tokens: <|r2|> opens a turn, EOS
# ends it.
# Qwen's shape with the tokenizer's own specials: <|r2|> opens a message, </s> (EOS) ends it; the
# tools, when given, in a system message naming the Hermes '<tool_call>' format (engine/agents);
# an assistant message's tool_calls (OpenAI/TRL shape) written as Hermes blocks after its content.
CHAT_TEMPLATE = ("{% if tools %}<|r2|>system\nTools: {{ tools | tojson }} Call one as <tool_call>"
                 "{\"name\": ..., \"arguments\": ...}</tool_call></s>\n{% endif %}"
                 "{% for m in messages %}<|r2|>{{ m['role'] }}\n{{ m['content'] }}"
                 "{% for c in m.tool_calls or [] %}<tool_call>{\"name\": \"{{ c.function.name }}\", "
                 "\"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}</s>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|r2|>assistant\n{% endif %}")


def make_chat_tokenizer():
    """make_tokenizer() with CHAT_TEMPLATE, as a chat model's tokenizer (saved with it)."""
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Token ids from 10 up: never EOS or a special token, so prompts are plain text.
    return [torch.randint(10, VOCAB, (n,), generator=g).tolist() for n in lengths]


def rewards_in_thread(fn):
    """`fn` opened as a run's reward functions in the test's process (build_models' argument)."""
    from fusedrl.engine.stages.rewards.combined import open_reward_functions
    return open_reward_functions([fn], None, "thread", 60.0)


def make_cycle_model(period: int = 7, sharpness: float = 30.0, seed: int = 0):
    """A Llama whose layers add nothing (their output projections zero) and whose LM head gives
    token v after t the logit sharpness * <e_u, e_t>, u the id before v on its cycle of `period`
    ids (from 10 up): after t comes, mostly, the next id of its cycle, so its text repeats with
    that period (speculative decoding's n-gram drafts then hold); a lower sharpness spreads the
    distribution."""
    model = make_hf_model("llama2", seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        embed = torch.randn(VOCAB, BASE["hidden_size"], generator=g)
        embed = embed / embed.norm(dim=-1, keepdim=True)
        model.model.embed_tokens.weight.copy_(embed)
        ids = torch.arange(VOCAB)
        start = 10 + (ids - 10) // period * period  # the first id of its cycle
        cycled = (ids >= 10) & (ids < 10 + (VOCAB - 10) // period * period)
        before = torch.where(cycled, start + (ids - start - 1) % period, ids)
        model.lm_head.weight.copy_(sharpness * embed[before] / BASE["hidden_size"] ** 0.5)
    return model


def sample_responses(actor, prompts, params):
    """A HybridActor's params.n responses per prompt from its current weights (prompt by prompt,
    sample by sample), and their sampler log-probs [sum of response lengths] on its device, as a
    rollout's rows read them."""
    from fusedrl.engine.inference.request import Request
    seqs = actor.run([Request(p, params, sample_index=j) for p in prompts for j in range(params.n)])
    return ([s.completion_token_ids for s in seqs],
            actor.device_logprobs([slot for s in seqs for slot in s.logprob_slots]))

"""Multi-turn test parts: the tests' tokenizer with a small chat template that takes tools (Hermes
'<tool_call>' blocks), and a tiny qwen2 model saved with it."""
import json

from engine_testing import make_hf_model, make_tokenizer

# Qwen's shape with the tokenizer's own specials: <|r2|> opens a message, </s> (EOS) ends it.
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|r2|>system\\nTools: ' + (tools | tojson) + ' Call one as <tool_call>"
    "{\"name\": ..., \"arguments\": ...}</tool_call></s>\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|r2|>' + m['role'] + '\\n' + m['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|r2|>assistant\\n' }}{% endif %}")


def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_chat_model(path):
    """A tiny qwen2 model with the chat tokenizer in `path`."""
    make_hf_model("qwen2").save_pretrained(path)
    chat_tokenizer().save_pretrained(path)
    return path


def tool_call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"

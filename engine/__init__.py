"""fusedrl engine: the model, generation and trainers built on `kernels` (see the README).

`LLM(model_dir).generate(prompts, SamplingParams(...))` for generation; `load_model` / `save_model`
for Hugging Face directories; `CausalLM.forward_packed` for the training forward.
"""
from engine.checkpoint import load_model, save_model
from engine.llm import LLM, Completion, RequestOutput
from engine.model import CausalLM
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "Completion", "CausalLM", "load_model", "save_model"]

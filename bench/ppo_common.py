"""What both sides of bench_ppo.py share: the shape of an iteration, the prompts, the word-level
tokenizer whose token i reads `t<i>`, the verifiable reward function of the GRPO comparison, the
LoRA targets and the clock of the measured iteration."""

from __future__ import annotations

import dataclasses
import re
import time

import torch
import transformers

from fusedrl.bench import timing

PAD_ID = 0  # prompts are drawn from ids >= 10, so neither pad nor EOS appears in them
GRPO_KL_COEF = 0.001  # ours: ppo.kl_loss_coef (GRPO's default); TRL: beta


@dataclasses.dataclass(frozen=True)
class Shape:
    prompts: int
    samples: int
    prompt_len: int
    new_tokens: int
    minibatches: int
    micro: int
    tokens_per_micro: int | None = (
        None  # ours: rows packed up to this many tokens per forward instead
    )

    @property
    def rows(self) -> int:
        return self.prompts * self.samples

    def __post_init__(self):
        if self.rows % (self.minibatches * self.micro):
            raise ValueError(
                f"prompts*samples={self.rows} must be a multiple of minibatches*micro="
                f"{self.minibatches * self.micro}"
            )


def even_token_share(prompts, completions, **_) -> list[float]:
    """The verifiable reward of the GRPO comparison: the share of a completion's tokens (`t<id>`
    words, see build_tokenizer) whose id is even. Both sides call it on decoded texts."""
    scores = []
    for text in completions:
        ids = [int(i) for i in re.findall(r"t(\d+)", text)]
        scores.append(sum(i % 2 == 0 for i in ids) / max(len(ids), 1))
    return scores


def build_tokenizer(eos_id: int, vocab_size: int | None = None):
    """A real fast tokenizer carrying the special ids and, with vocab_size, a word `t<i>` for every
    other id, so that texts and ids map one to one (the GRPO sides exchange texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size or 0)}
    vocab.update({"<pad>": PAD_ID, "<eos>": eos_id})
    vocab = {
        word: i
        for word, i in vocab.items()
        if word in ("<pad>", "<eos>") or i not in (PAD_ID, eos_id)
    }
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>"
    )


def make_prompts(shape: Shape, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, vocab, (shape.prompts, shape.prompt_len), generator=g).tolist()


class IterationClock:
    """Wall time and peak memory between the last two marks: marks at each iteration's start and
    at the end of the last, so with two iterations that is the second (the first warms up). The
    peak is above `held` (bytes the process held before the side began: not the side's)."""

    def __init__(self, device: torch.device, held: int = 0):
        self.device, self.marks, self.held = device, [], held

    def mark(self):
        timing.synchronize(self.device)
        self.marks.append(time.perf_counter())
        if self.device.type == "cuda" and len(self.marks) < 3:  # the end mark keeps the peak
            torch.cuda.reset_peak_memory_stats(self.device)

    def result(self) -> dict:
        if len(self.marks) != 3:
            raise RuntimeError(
                f"expected marks at 2 iterations' starts and the end, got {len(self.marks)}"
            )
        peak = (
            (torch.cuda.max_memory_allocated(self.device) - self.held) / 2**30
            if self.device.type == "cuda"
            else None
        )
        timing.note_warm_up(self.marks[1] - self.marks[0])  # the first iteration: the case's compile_s
        return {"iteration_s": self.marks[2] - self.marks[1], "peak_gib": peak}


def lora_targets() -> list[str]:
    from fusedrl.engine.config.lora import PROJECTIONS

    return list(PROJECTIONS)

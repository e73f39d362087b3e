"""The rollout's samples in flight, typed: a `Group` (its prompt, the data row it came from, its
samples) of `Sample`s, each a trajectory of one turn (a single-turn answer) or of many (a
multi-turn trajectory, with its model mask and turns). Every row kind continues them the same way
(`advance(rows, stop)`: engine/stages/rollout/answer_rows.py, engine/agents/carried.py) and every
schedule holds them: whole groups (fresh ones, run to their end) and partial rollouts (carried
across iterations, saved in every checkpoint).

A checkpoint holds each group's `state_dict()`: plain lists and numbers (no pickle), read back with
`Group.load`. What lives only beside the loop (a sample's routing records and its environment) is
not in it. A new typed field of a prompt (images, say) is one more field of `Group`, saved in its
state_dict.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..data.prompts import PromptRow


@dataclass
class Sample:
    """One sample of a group. seed: its own random stream (a carried sample: a run continues it at
    its own positions), or None: the stream the run's params.seed fixes for sample `index` of its
    group; tokens: every token after the group's prompt (the model's and an environment's);
    logprobs: the sampler's, one per model token; versions: the iteration (policy version) that
    drew each model token; finish: why it ended (None while in flight); model_mask: True on the
    model's tokens (None: a single-turn answer, every token the model's); turn_start: where in
    `tokens` the model's current turn began; turns: model turns so far.
    Beside the loop, never in a checkpoint: routing, the routing records of the forwards that last
    continued it [prompt + tokens, sparse layers, k]; environment, its live environment
    (engine/agents/carried.py)."""
    seed: int | None = None
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finish: str | None = None
    model_mask: list[bool] | None = None
    turn_start: int = 0
    turns: int = 0
    routing: object = None
    environment: object = None

    @property
    def multi_turn(self) -> bool:
        return self.model_mask is not None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def restart(self) -> None:
        """Back to no token (its seed kept: it draws the same stream again)."""
        self.tokens, self.logprobs, self.versions, self.finish = [], [], [], None
        if self.multi_turn:
            self.model_mask, self.turn_start, self.turns = [], 0, 0

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it (plain values)."""
        out = {"seed": self.seed, "answer": list(self.tokens), "logprobs": list(self.logprobs),
               "versions": list(self.versions), "finish": self.finish}
        if self.index:
            out["index"] = self.index
        if self.multi_turn:
            out.update(mask=list(self.model_mask), turn_start=self.turn_start, turns=self.turns)
        return out

    def load_state_dict(self, state: dict) -> None:
        """Its checkpointed fields set from `state` (a state_dict); routing and environment
        kept."""
        self.seed, self.index = state.get("seed"), state.get("index", 0)
        self.tokens, self.logprobs = list(state["answer"]), list(state["logprobs"])
        self.versions, self.finish = list(state["versions"]), state["finish"]
        mask = state.get("mask")
        self.model_mask = None if mask is None else list(mask)
        self.turn_start, self.turns = state.get("turn_start", 0), state.get("turns", 0)

    @classmethod
    def load(cls, state: dict) -> "Sample":
        sample = cls()
        sample.load_state_dict(state)
        return sample


@dataclass
class Group:
    """A prompt's samples: prompt, its token ids (a multi-turn group's: its environments'
    rendered opening); source, the data row it came from (the reward functions' and the
    environments' input; None: the decoded prompt stands in)."""
    prompt: list[int]
    samples: list[Sample]
    source: PromptRow | None = None

    @classmethod
    def new(cls, prompt: list[int], n: int, seed: int | None = None,
            source: PromptRow | None = None, multi_turn: bool = False) -> "Group":
        """A group of n samples with no token yet: each with its own seed drawn from `seed` (a
        group to carry), or with seed None, sample j drawing the stream params.seed fixes for
        it."""
        rng = None if seed is None else random.Random(seed)
        samples = [Sample(index=j) if rng is None else Sample(seed=rng.getrandbits(63))
                   for j in range(n)]
        for sample in samples:
            sample.model_mask = [] if multi_turn else None
        return cls(list(prompt), samples, source)

    @property
    def complete(self) -> bool:
        return all(s.done for s in self.samples)

    @property
    def images(self):
        """The prompt's processed images (its source row's ImageInputs), or None: text. Read from
        the row, never copied, so a prompt's samples cannot part from its images."""
        return None if self.source is None else self.source.images

    def state_dict(self) -> dict:
        source = self.source
        return {"prompt": list(self.prompt), "samples": [s.state_dict() for s in self.samples],
                "source": None if source is None else {"prompt": source.prompt,
                                                       "columns": source.columns}}

    def load_state_dict(self, state: dict) -> None:
        """The prompt and each sample's checkpointed fields set from `state` (a context group's
        first rank's, say), in place."""
        self.prompt = list(state["prompt"])
        for sample, kept in zip(self.samples, state["samples"]):
            sample.load_state_dict(kept)

    @classmethod
    def load(cls, state: dict) -> "Group":
        source = state.get("source")
        row = None if source is None else PromptRow(list(state["prompt"]), source["prompt"],
                                                    source["columns"])
        return cls(list(state["prompt"]), [Sample.load(s) for s in state["samples"]], row)


def unfinished(groups: list[Group]) -> list[tuple[Group, Sample]]:
    """(group, sample) of every sample still to generate, oldest group first."""
    return [(group, s) for group in groups for s in group.samples if not s.done]

"""The rollout's samples in flight, typed: a `Group` (its prompt, the data row it came from, its
samples) of `Sample`s, each a trajectory of one turn (a single-turn answer) or of many (a
multi-turn trajectory, with its model mask and turns). Every row kind continues them the same way
(`advance(rows, stop)`: engine/stages/rollout/answer_rows.py, engine/agents/carried.py) and every
schedule holds them: whole groups (fresh ones, run to their end) and partial rollouts (carried
across iterations, saved in every checkpoint).

A checkpoint holds each group's `state_dict()`: plain lists and numbers (no pickle), read back with
`Group.load`. What lives only beside the loop (a sample's routing records and its environment) is
not in it. A prompt row with images is named, not copied: its index in the run's prompts and the
sha256 of its processed images (image_prefill.image_digest), so a resumed run reads the same row,
images included, back from the data (`Group.load(state, rows)`), and a row whose images changed
since is a one-line error rather than a sample continued over other pixels.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..data.prompts import PromptRow
from .image_prefill import image_digest


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
    environments' input; None: the decoded prompt stands in); images_sha256: its images' digest,
    once a checkpoint has named them (computed once: a group is saved every iteration it is in
    flight)."""
    prompt: list[int]
    samples: list[Sample]
    source: PromptRow | None = None
    images_sha256: str | None = field(default=None, repr=False, compare=False)

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
        return {"prompt": list(self.prompt), "samples": [s.state_dict() for s in self.samples],
                "source": self._source_state()}

    def _source_state(self) -> dict | None:
        """The source row as a checkpoint keeps it: a text row's prompt and columns; a row with
        images by its index in the run's prompts and its images' sha256 (never its pixels)."""
        source = self.source
        if source is None:
            return None
        if source.images is None:
            return {"prompt": source.prompt, "columns": source.columns}
        if source.index is None:
            raise ValueError("a group in flight has a prompt row with images but no index in the "
                             "run's prompts (PromptRow.index): a checkpoint could not name it")
        if self.images_sha256 is None:
            self.images_sha256 = image_digest(source.images)
        return {"row": source.index, "images_sha256": self.images_sha256}

    def load_state_dict(self, state: dict) -> None:
        """The prompt and each sample's checkpointed fields set from `state` (a context group's
        first rank's, say), in place."""
        self.prompt = list(state["prompt"])
        for sample, kept in zip(self.samples, state["samples"]):
            sample.load_state_dict(kept)

    @classmethod
    def load(cls, state: dict, rows: list[PromptRow] | None = None) -> "Group":
        """The group a state_dict holds; rows: the run's prompts (load_prompts' list), where a
        row with images named by the state is read back from (its images the data's)."""
        source, prompt = state.get("source"), list(state["prompt"])
        samples = [Sample.load(s) for s in state["samples"]]
        if source is None:
            return cls(prompt, samples)
        if "row" not in source:
            return cls(prompt, samples, PromptRow(prompt, source["prompt"], source["columns"]))
        row = named_row(source["row"], source["images_sha256"], prompt, rows)
        return cls(prompt, samples, row, source["images_sha256"])


def named_row(index: int, sha256: str, prompt: list[int],
              rows: list[PromptRow] | None) -> PromptRow:
    """rows[index], checked to be the row a checkpoint named: the same prompt ids and images of
    the same sha256; else a one-line ValueError (the data changed since the checkpoint)."""
    where = f"the checkpoint's group in flight on prompt row {index}"
    if rows is None or not 0 <= index < len(rows):
        have = "no prompts" if rows is None else f"{len(rows)} prompts"
        raise ValueError(f"{where}: the run has {have}; resume with the data it was saved with")
    row = rows[index]
    got = None if row.images is None else image_digest(row.images)
    if row.ids != prompt or got != sha256:
        what = "prompt tokens" if row.ids != prompt else f"images (sha256 {str(got)[:12]})"
        raise ValueError(f"{where}: the data's row has other {what} than the checkpoint's "
                         f"(images sha256 {sha256[:12]}): the data changed since the checkpoint")
    return row


def unfinished(groups: list[Group]) -> list[tuple[Group, Sample]]:
    """(group, sample) of every sample still to generate, oldest group first."""
    return [(group, s) for group in groups for s in group.samples if not s.done]

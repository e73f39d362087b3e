"""The typed samples in flight: a group's samples draw their own seeded streams (carried) or their
index's (whole groups); a checkpoint's state_dict is plain JSON that loads back to the same
samples, without what lives beside the loop (routing records, environments); a restart keeps the
seed and empties the rest; a context group's first rank's state sets a group in place; a row with
images is named in a checkpoint (index and sha256), never copied, and read back from the data."""
import json

import pytest
import torch

from fusedrl.engine.data.prompts import PromptRow
from fusedrl.engine.data.vision_processor import ImageInputs
from fusedrl.engine.inference.image_prefill import image_digest
from fusedrl.engine.inference.in_flight import Group, Sample, unfinished


def test_new_groups_draw_seeded_streams_or_their_index_s():
    carried = Group.new([1, 2], 3, seed=5)
    assert [s.seed for s in carried.samples] == [s.seed for s in Group.new([1, 2], 3, 5).samples]
    assert len({s.seed for s in carried.samples}) == 3 and {s.index for s in carried.samples} == {0}
    whole = Group.new([1, 2], 3)
    assert [(s.seed, s.index) for s in whole.samples] == [(None, 0), (None, 1), (None, 2)]
    assert all(s.model_mask is None for s in whole.samples)
    assert all(s.model_mask == [] for s in Group.new([], 2, multi_turn=True).samples)


def trajectory_group() -> Group:
    group = Group.new([4, 5, 6], 2, seed=9, source=PromptRow([4, 5, 6], "hi", {"level": 2}),
                      multi_turn=True)
    first, second = group.samples
    first.tokens, first.model_mask = [7, 8, 9], [True, False, True]
    first.logprobs, first.versions, first.turn_start, first.turns = [-1.0, -2.5], [3, 4], 2, 1
    first.finish = "done"
    first.routing, first.environment = torch.zeros(6, 1, 2), object()
    second.tokens, second.model_mask, second.logprobs, second.versions = [7], [True], [-0.5], [4]
    return group


def test_a_checkpoint_s_state_dict_is_json_and_loads_back_without_what_lives_beside():
    group = trajectory_group()
    state = json.loads(json.dumps(group.state_dict()))
    loaded = Group.load(state)
    assert loaded.prompt == group.prompt and loaded.source == group.source
    for got, want in zip(loaded.samples, group.samples):
        assert (got.seed, got.index, got.tokens, got.logprobs, got.versions, got.finish,
                got.model_mask, got.turn_start, got.turns) == (
            want.seed, want.index, want.tokens, want.logprobs, want.versions, want.finish,
            want.model_mask, want.turn_start, want.turns)
        assert got.routing is None and got.environment is None
    assert Group.load(Group.new([1], 2).state_dict()).samples[1].index == 1
    answer = Group.load(Group.new([1], 1, seed=3).state_dict()).samples[0]
    assert not answer.multi_turn and "mask" not in answer.state_dict()


def test_a_restart_keeps_the_seed_and_a_first_rank_s_state_sets_the_group_in_place():
    group = trajectory_group()
    first = group.samples[0]
    seed, routing = first.seed, first.routing
    assert [s for _, s in unfinished([group])] == [group.samples[1]]
    first.restart()
    assert (first.seed, first.tokens, first.model_mask, first.turns, first.finish) == (
        seed, [], [], 0, None)
    other = trajectory_group()
    other.prompt = [1]
    group.load_state_dict(other.state_dict())
    assert group.prompt == [1] and first.tokens == [7, 8, 9] and first.routing is routing
    assert not group.complete and Group([1], [Sample(finish="stop")]).complete


def image_rows() -> list[PromptRow]:
    def images(seed):
        return ImageInputs(torch.randn(4, 6, generator=torch.Generator().manual_seed(seed)),
                           torch.tensor([[1, 2, 2]]))
    return [PromptRow([3, 9, 9, 4, i], "how many ?", {"images": [f"{i}.png"]}, images(i), i)
            for i in range(3)]


def test_a_row_with_images_is_named_by_index_and_sha256_and_read_back_from_the_data():
    rows = image_rows()
    group = Group.new(rows[1].ids, 2, seed=4, source=rows[1])
    group.samples[0].tokens, group.samples[0].logprobs, group.samples[0].versions = [5], [-1.0], [0]
    state = json.loads(json.dumps(group.state_dict()))
    assert state["source"] == {"row": 1, "images_sha256": image_digest(rows[1].images)}
    again = image_rows()  # a resumed run's data: the same rows, read again
    loaded = Group.load(state, again)
    assert loaded.source is again[1] and loaded.images is again[1].images
    assert loaded.samples[0].tokens == [5] and loaded.state_dict() == state
    with pytest.raises(ValueError, match=r"prompt row 1: the run has no prompts"):
        Group.load(state)
    changed = image_rows()
    changed[1] = PromptRow(rows[1].ids, "how many ?", {}, image_rows()[2].images, 1)
    with pytest.raises(ValueError, match=r"row 1: the data's row has other images .* the data "
                                         "changed since the checkpoint$"):
        Group.load(state, changed)
    with pytest.raises(ValueError, match="no index in the run's prompts"):
        Group.new([1], 1, source=PromptRow([1], "x", {}, rows[0].images)).state_dict()

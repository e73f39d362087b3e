"""The typed samples in flight: a group's samples draw their own seeded streams (carried) or their
index's (whole groups); a checkpoint's state_dict is plain JSON that loads back to the same
samples, without what lives beside the loop (routing records, environments); a restart keeps the
seed and empties the rest; a context group's first rank's state sets a group in place."""
import json

import torch

from fusedrl.engine.data.prompts import PromptRow
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

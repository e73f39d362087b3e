"""The demo's seconds by stage: each second counted in the innermost stage open, once."""
import pytest

from fusedrl.engine.demos.sorting import by_stage
from fusedrl.engine.demos.stage_clock import StageClock


class Ticks:
    """A clock read that moves only when told to."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_nested_stage_pauses_the_outer_one():
    ticks = Ticks()
    clock = StageClock(ticks)
    ticks.now += 5.0  # before any stage: counted nowhere
    with clock.stage("sft"):
        ticks.now += 2.0
    with clock.stage("rl"):
        ticks.now += 3.0
        with clock.stage("evaluations"):
            ticks.now += 0.5
        ticks.now += 1.0
        with clock.stage("evaluations"):
            ticks.now += 0.25
    assert clock.seconds == {"sft": 2.0, "rl": 4.0, "evaluations": 0.75}
    assert list(clock.seconds) == ["sft", "rl", "evaluations"]
    assert clock.total() == 11.75  # the seconds before any stage too


def test_a_stage_left_by_an_error_is_charged_and_closed():
    ticks = Ticks()
    clock = StageClock(ticks)
    with pytest.raises(KeyError):
        with clock.stage("rm"):
            ticks.now += 1.5
            raise KeyError("x")
    ticks.now += 9.0  # no stage open any more
    with clock.stage("rl"):
        ticks.now += 1.0
    assert clock.seconds == {"rm": 1.5, "rl": 1.0}


def test_the_table_line_adds_up_to_the_wall_time():
    line = by_stage({"setup": 1.25, "sft": 7.0, "evaluations": 2.0, "rl": 20.0}, 31.0, "PPO")
    assert line == "setup 1.2 s, SFT 7.0 s, evaluations 2.0 s, PPO 20.0 s, other 0.8 s"

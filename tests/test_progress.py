"""Progress in a log file: whole lines, at a pace a person can read."""

from __future__ import annotations

import io

from fedlpp.progress import LineBar


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_nested_bar_writes_a_line_at_start_at_most_every_interval_and_at_the_end():
    out, clock = io.StringIO(), Clock()
    with LineBar(100, "round 1 client steps", file=out, interval=30.0, clock=clock) as bar:
        for _ in range(100):
            clock.now += 1.0
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "round 1 client steps: 0/100 (0 s)"
    assert lines[1:4] == [
        "round 1 client steps: 30/100 (30 s)",
        "round 1 client steps: 60/100 (60 s)",
        "round 1 client steps: 90/100 (90 s)",
    ]
    assert lines[-1] == "round 1 client steps: 100/100 done in 100 s" and len(lines) == 5


def test_a_top_level_bar_writes_one_line_per_step_with_its_postfix_and_no_repeat_at_the_end():
    out, clock = io.StringIO(), Clock()
    bar = LineBar(3, "rounds", initial=1, file=out, interval=0.0, clock=clock)
    for loss in (1.5, 1.25):
        clock.now += 10
        bar.set_postfix({"loss": loss}, refresh=False)
        bar.update(1)
    bar.close()
    bar.close()  # closing twice writes nothing more
    assert out.getvalue().splitlines() == ["rounds: 1/3 (0 s)", "rounds: 2/3 (10 s) [loss=1.5]", "rounds: 3/3 (20 s) [loss=1.25]"]


def test_a_bar_left_by_an_error_says_it_stopped_not_done():
    import pytest

    out, clock = io.StringIO(), Clock()
    with pytest.raises(RuntimeError), LineBar(16, "round 2 client steps", file=out, clock=clock) as bar:
        bar.update(3)
        clock.now += 5
        raise RuntimeError("a client failed")
    assert out.getvalue().splitlines()[-1] == "round 2 client steps: 3/16 stopped after 5 s"

"""Progress lines off a terminal: the pace of a long loop and the time it has left."""

from __future__ import annotations


def test_the_pace_of_a_loop_says_the_time_left(monkeypatch):
    from model_compress.core import terminal

    clock = iter([100.0, 104.0, 108.0, 108.0])
    monkeypatch.setattr(terminal.time, "monotonic", lambda: next(clock))
    pace = terminal.Pace()
    assert pace.text(10, "block") == ""
    pace.tick()  # the clock starts
    pace.tick()
    pace.tick()
    assert pace.text(30, "block") == ", 4.0 s per block, about 2 min left"

"""progress: plain lines on a non-TTY stream at least every ``every_s`` (fake clock), a tqdm bar on a TTY."""

from __future__ import annotations

import io

from onnxsparse.progress import Progress, clock_text, progress


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_lines_every_interval_with_rate_eta_and_postfix() -> None:
    clock, out = FakeClock(), io.StringIO()
    seen = []
    for i in progress(
        range(10),
        desc="calibrate",
        unit="batch",
        every_s=30.0,
        stream=out,
        clock=clock,
        postfix=lambda: {"loss": 0.123456},
    ):
        seen.append(i)
        clock.t += 10.0  # each step takes 10 s: a line at step 1 (after 5 s), then every 3 steps (30 s)
    assert seen == list(range(10))
    lines = out.getvalue().splitlines()
    assert lines[0] == "calibrate 1/10 (10%) 0.1 batch/s ETA 01:30 loss=0.1235"
    assert lines[1] == "calibrate 4/10 (40%) 0.1 batch/s ETA 01:00 loss=0.1235"
    assert lines[-1] == "calibrate 10/10 (100%) 0.1 batch/s done in 01:40 loss=0.1235"
    assert len(lines) == 5  # steps 1, 4, 7, 10 and the final line


def test_unknown_total_quick_loops_and_silence() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress(desc="prune", unit="layer", stream=out, clock=clock) as p:
        clock.t += 2.0
        p.update(4)  # 2 s in: too early for a first line
        assert out.getvalue() == ""
        clock.t += 4.0
        p.update(2)
    assert out.getvalue().splitlines() == ["prune 6 1 layer/s", "prune 6 1 layer/s done in 00:06"]
    quick = io.StringIO()
    assert list(progress(range(100), stream=quick, clock=FakeClock())) == list(range(100))
    assert quick.getvalue() == ""  # a loop under 5 s leaves the log alone
    quiet = io.StringIO()
    clock = FakeClock()
    for _ in progress(iter([1, 2]), enabled=False, stream=quiet, clock=clock, every_s=0.0):
        clock.t += 60.0
    assert quiet.getvalue() == ""


def test_generator_total_from_len_and_tty_bar() -> None:
    out = io.StringIO()
    assert list(progress([1, 2, 3], desc="x", stream=out, tty=True)) == [1, 2, 3]
    text = out.getvalue()
    assert "\r" in text and "| 0/3 [" in text  # tqdm's redrawn bar, not the plain lines
    assert "ETA" not in text


def test_clock_text() -> None:
    assert clock_text(5) == "00:05" and clock_text(3725) == "1:02:05"

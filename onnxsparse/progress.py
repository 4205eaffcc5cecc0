"""Progress reporting that works on a terminal and in a log file: a tqdm bar on a TTY, plain lines elsewhere.

A tqdm bar redraws one line with carriage returns; sent to a log file it shows nothing useful (or, with tqdm's
non-TTY fallback, nothing at all for long stretches: a 1200-step fine-tune printed nothing for 25 minutes).
So when stderr is not a terminal this writes one self-contained line once the loop has run 5 s (a quick loop
prints nothing), then at least every ``every_s`` seconds, and a last one when the loop ends::

    calibrate 12/40 (30%) 3.21 batch/s ETA 00:08 tensors=14
    calibrate 40/40 (100%) 3.30 batch/s done in 00:12 tensors=14

The lines go straight to stderr like tqdm's bar, not through ``logging``: without ``--verbose`` the CLI logs
warnings only, and progress is not a warning but must still show. Library callers that want silence pass
``enabled=False`` (``PassContext.progress`` is False by default).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

#: The first plain line waits this long (or ``every_s`` if shorter): loops that end sooner print nothing.
FIRST_LINE_S = 5.0

Postfix = Callable[[], "str | Mapping[str, Any] | None"]


def _format_postfix(value: str | Mapping[str, Any] | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return " ".join(f"{k}={_short(v)}" for k, v in value.items())


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def clock_text(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from an hour on)."""
    s = max(0, round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """A progress reporter updated by hand (``update``) — for loops that are not one iterable.

    ``enabled=False``: silent. Otherwise a tqdm bar when ``stream`` is a TTY (``tty`` overrides the check),
    else plain lines (see the module docstring). ``clock`` is injectable so tests need not sleep.
    """

    def __init__(
        self,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        enabled: bool | None = None,
        every_s: float = 30.0,
        postfix: Postfix | Mapping[str, Any] | str | None = None,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every_s = every_s
        self.postfix = postfix
        self.n = 0
        self._clock = clock
        self._stream = stream if stream is not None else sys.stderr
        self._start = clock()
        self._last_line: float | None = None
        self._last_postfix = self._start
        self._closed = False
        self._bar: Any = None
        self.enabled = enabled is not False
        if self.enabled and (tty if tty is not None else _isatty(self._stream)):
            from tqdm import tqdm  # lazily: only a terminal needs it

            self._bar = tqdm(
                total=total, desc=desc or None, unit=unit, file=self._stream, dynamic_ncols=True, leave=False
            )

    def _postfix_text(self) -> str:
        p = self.postfix
        return _format_postfix(p() if callable(p) else p)

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps done; writes a line when one is due."""
        self.n += n
        if not self.enabled:
            return
        now = self._clock()
        if self._bar is not None:
            if self.postfix is not None and now - self._last_postfix >= 0.5:
                self._bar.set_postfix_str(self._postfix_text(), refresh=False)
                self._last_postfix = now
            self._bar.update(n)
            return
        if self._last_line is None:
            due = now - self._start >= min(FIRST_LINE_S, self.every_s)
        else:
            due = now - self._last_line >= self.every_s
        if due:
            self._write(now, done=False)

    def line(self, now: float | None = None, done: bool = False) -> str:
        """The plain progress line for the current state."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = self.n / elapsed
        parts = [self.desc] if self.desc else []
        if self.total:
            parts.append(f"{self.n}/{self.total} ({100.0 * self.n / self.total:.0f}%)")
        else:
            parts.append(f"{self.n}")
        parts.append(f"{rate:.3g} {self.unit}/s")
        if done:
            parts.append(f"done in {clock_text(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"ETA {clock_text((self.total - self.n) / rate)}")
        post = self._postfix_text()
        if post:
            parts.append(post)
        return " ".join(parts)

    def _write(self, now: float, done: bool) -> None:
        self._stream.write(self.line(now, done) + "\n")
        self._stream.flush()
        self._last_line = now

    def close(self) -> None:
        """End the report: close the bar, or write the final line (when any line was written)."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._last_line is not None:
            self._write(self._clock(), done=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False


def progress(
    iterable: Iterable[T],
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool | None = None,
    every_s: float = 30.0,
    postfix: Postfix | Mapping[str, Any] | str | None = None,
    **kwargs: Any,
) -> Iterator[T]:
    """Yield from ``iterable`` while reporting progress (``Progress``); ``total`` defaults to ``len()``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, unit, enabled, every_s, postfix, **kwargs) as p:
        for item in iterable:
            yield item
            p.update()

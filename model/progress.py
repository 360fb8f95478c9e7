"""A progress line with rate and ETA on stderr, for the long steps of the model pipeline.

    with Progress("reading records", total=size, unit="B") as bar:
        for chunk in chunks:
            bar.update(len(chunk), note=f"{lines:,} lines")

On a terminal the line is redrawn in place at most five times a second; otherwise (CI logs, a
file) one line is printed every ``every_s`` seconds, so a long run still shows it is alive
without flooding the log. ``close`` prints the final line with the elapsed time and mean rate.
Without ``total`` there is no percentage and no ETA, only the count and the rate.
No dependency beyond the standard library.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

TTY_REDRAW_S = 0.2
LOG_EVERY_S = 10.0


class Progress:
    """Counts work done, and tells it on ``stream`` (stderr by default) with rate and ETA."""

    def __init__(
        self,
        label: str,
        total: float | None = None,
        *,
        unit: str = "",
        stream: TextIO | None = None,
        every_s: float = LOG_EVERY_S,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.total = total if total is None or total > 0 else None
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.done: float = 0
        self.note = ""
        self._clock = clock
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._interval = TTY_REDRAW_S if self._tty else every_s
        self.started = self._clock()
        self._next = self.started + self._interval
        self._closed = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def update(self, n: float = 1, *, note: str | None = None) -> None:
        """Add ``n`` to the work done (``note``, if given, is shown after the figures)."""
        self.done += n
        if note is not None:
            self.note = note
        if self.enabled:
            now = self._clock()
            if now >= self._next:
                self._next = now + self._interval
                self._show(self.line(now))

    @property
    def elapsed_s(self) -> float:
        """Seconds since the bar was made."""
        return self._clock() - self.started

    def rate(self, now: float | None = None) -> float:
        """Mean work per second so far."""
        now = self._clock() if now is None else now
        return self.done / max(now - self.started, 1e-9)

    def line(self, now: float | None = None, *, final: bool = False) -> str:
        """The progress line as it would be shown now."""
        now = self._clock() if now is None else now
        rate = self.rate(now)
        unit = f" {self.unit}" if self.unit else ""
        parts = [f"{self.label}:"]
        if self.total is not None:
            share = min(self.done / self.total, 1.0)
            parts.append(f"{share:.0%} {_amount(self.done)}/{_amount(self.total)}{unit}")
        else:
            parts.append(f"{_amount(self.done)}{unit}")
        parts.append(f"{_amount(rate)}{unit}/s")
        if final:
            parts.append(f"in {_duration(now - self.started)}")
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {_duration(max(self.total - self.done, 0) / rate)}")
        if self.note:
            parts.append(self.note)
        return " · ".join([" ".join(parts[:2]), *parts[2:]])

    def close(self) -> None:
        """Print the final line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._show(self.line(final=True), end=True)

    def _show(self, text: str, *, end: bool = False) -> None:
        if self._tty:
            self.stream.write(f"\r\x1b[K{text}" + ("\n" if end else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _amount(value: float) -> str:
    """1234567 -> '1.23M', 5321 -> '5,321': short, for a progress line."""
    if value >= 10_000_000:
        for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
            if value >= size:
                return f"{value / size:.2f}{suffix}"
    if isinstance(value, float) and not value.is_integer() and value < 100:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _duration(seconds: float) -> str:
    """'0:07', '12:03', '1:02:03'."""
    s = int(seconds + 0.5)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02}:{s:02}" if h else f"{m}:{s:02}"

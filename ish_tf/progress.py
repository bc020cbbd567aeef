"""Progress of long work on stderr: a bar on a terminal, a steady line elsewhere.

One small class shared by fetch, extract, train, embed, evaluate and the quickstart
(no dependency: tqdm is not required).

* On a terminal (stderr is a TTY) a bar is redrawn in place at most every `min_interval`
  seconds: ``train [#########---------] 120/400 steps 30% 00:12<00:28 loss 0.4310``.
* Elsewhere (a log file, CI, a pipe) one plain line is printed at most every
  `steady_interval` seconds, and a closing line when at least one was printed, so short
  work stays quiet and long work is never silent:
  ``train: 120/400 steps (30%), 12 s elapsed, about 28 s left, loss 0.4310``.
* `ISH_TF_PROGRESS=0` turns both off, `=1` forces the bar (tests, `script` logs);
  `enabled=False` turns one progress off (a library caller that reports itself).

The counts are the caller's units (images, shards, steps, groups); the ETA is the mean
rate since the start applied to what is left.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

BAR_WIDTH = 24
STEADY_INTERVAL_S = 10.0


def format_seconds(seconds: float) -> str:
    """`75` -> ``01:15``, `3725` -> ``1:02:05``; ``--:--`` when unknown."""
    if seconds != seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _mode(enabled: bool | None, stream: IO) -> str:
    """"bar", "steady" or "off" from `enabled`, ISH_TF_PROGRESS and the stream."""
    env = os.environ.get("ISH_TF_PROGRESS", "")
    if enabled is False or env == "0":
        return "off"
    if enabled is True or env == "1":
        return "bar"
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "bar" if tty else "steady"


class Progress:
    """Counts done out of a total, drawn as a bar (terminal) or steady lines (elsewhere).

    Args:
      total: the planned count (None or 0: unknown; counts and rate are shown, no ETA).
      desc: what is being done, the line's prefix (``extract``, ``train``).
      enabled: None: a bar on a terminal, steady lines elsewhere; False: nothing;
        True: the bar, wherever `stream` goes.
      stream: where to draw (stderr).
      min_interval: seconds between redraws of the bar.
      unit: what is counted, shown after the counts (``images``, ``steps``).
      steady_interval: seconds between steady lines.
    """

    def __init__(self, total: int | None, desc: str = "", enabled: bool | None = None,
                 stream: IO | None = None, min_interval: float = 0.2, *, unit: str = "",
                 steady_interval: float = STEADY_INTERVAL_S):
        self.stream = stream if stream is not None else sys.stderr
        self.mode = _mode(enabled, self.stream)
        self.enabled = self.mode != "off"
        self.total, self.desc, self.unit = total, desc, unit
        self.min_interval, self.steady_interval = min_interval, steady_interval
        self.n = 0
        self.start = self._last = time.monotonic()
        self._steady_lines = 0
        self._drawn = False
        self.postfix = ""

    # ----------------------------------------------------------------- counting
    def update(self, k: int = 1, postfix: str | None = None) -> None:
        """Adds `k` to the count (and replaces the text after the counts, if given)."""
        self.n += k
        if postfix is not None:
            self.postfix = postfix
        if self.mode == "off":
            return
        now = time.monotonic()
        if self.mode == "bar":
            if now - self._last >= self.min_interval or self.n == self.total:
                self._last = now
                self._draw_bar(now)
        elif now - self._last >= self.steady_interval:
            self._last = now
            self._steady_line(now)

    def set_postfix(self, postfix: str) -> None:
        """Replaces the text shown after the counts (e.g. ``loss 0.4310``)."""
        self.postfix = postfix

    def write(self, line: str) -> None:
        """Prints a line without breaking the bar (the bar is redrawn below it)."""
        if self.mode == "bar" and self._drawn:
            self.stream.write("\r\033[K")
        self.stream.write(line.rstrip("\n") + "\n")
        if self.mode == "bar" and self._drawn:
            self._draw_bar(time.monotonic())
        self.stream.flush()

    # ----------------------------------------------------------------- text
    def _counts(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.n}/{self.total}{unit}" if self.total else f"{self.n}{unit}"

    def _eta(self, now: float) -> float:
        elapsed = now - self.start
        if not self.total or self.n <= 0:
            return float("nan")
        return elapsed * max(self.total - self.n, 0) / self.n

    def text(self, now: float | None = None) -> str:
        """The steady line for the current state (without a newline)."""
        now = time.monotonic() if now is None else now
        parts = [self._counts()]
        if self.total:
            parts[0] += f" ({100 * min(self.n / self.total, 1.0):.0f}%)"
        parts.append(f"{format_seconds(now - self.start)} elapsed")
        if self.total and self.n < self.total:
            parts.append(f"about {format_seconds(self._eta(now))} left")
        if self.postfix:
            parts.append(self.postfix)
        return f"{self.desc}: " + ", ".join(parts)

    def _draw_bar(self, now: float) -> None:
        elapsed = now - self.start
        if self.total:
            frac = min(self.n / self.total, 1.0)
            fill = int(BAR_WIDTH * frac)
            text = (f"{self.desc} [{'#' * fill}{'-' * (BAR_WIDTH - fill)}] {self._counts()} "
                    f"{100 * frac:3.0f}% {format_seconds(elapsed)}<{format_seconds(self._eta(now))}")
        else:
            rate = self.n / max(elapsed, 1e-9)
            text = f"{self.desc} {self._counts()} {format_seconds(elapsed)} {rate:.1f}/s"
        if self.postfix:
            text += f" {self.postfix}"
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self._drawn = True

    def _steady_line(self, now: float) -> None:
        self.stream.write(self.text(now) + "\n")
        self.stream.flush()
        self._steady_lines += 1

    # ----------------------------------------------------------------- closing
    def close(self) -> None:
        """Draws the final state: the bar's last frame, or a closing steady line when the
        work was long enough to print any."""
        if self.mode == "bar":
            self._draw_bar(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()
        elif self.mode == "steady" and self._steady_lines:
            self._steady_line(time.monotonic())
        self.mode = "off"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             enabled: bool | None = None, unit: str = "") -> Iterator[T]:
    """Wraps an iterable with a `Progress`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, enabled, unit=unit) as bar:
        for item in iterable:
            yield item
            bar.update()

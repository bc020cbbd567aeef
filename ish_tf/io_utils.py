"""Small I/O helpers shared by every stage: atomic writes and a quiet progress bar.

Every file a stage produces is written under a temporary name in the same directory
and renamed into place only once complete, so a crash or Ctrl-C never leaves a file
that a rerun would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import IO, TypeVar

T = TypeVar("T")

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tmp_path_for(path: str) -> str:
    """Returns a unique temporary name beside `path` (same directory, same filesystem).

    mkstemp creates the file with mode 0600; it is widened to what a plain `open()`
    would give (0666 minus the umask) so renamed results stay readable by others.
    """
    directory, base = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=TMP_SUFFIX, dir=directory)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path; on success renames it to `path`, on error removes it.

    Args:
      path: the final destination. Its directory is created if missing.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """Opens a temporary file for writing and renames it to `path` when closed cleanly."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as f:
            yield f


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_open(path, "wb") as f:
        f.write(data)


def remove_stale_tmp(directory: str) -> list[str]:
    """Deletes leftover temporary files (from a killed run) in `directory`; returns their names."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        if name.startswith(".") and name.endswith(TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
                removed.append(name)
    return removed


class Progress:
    """A minimal progress bar on stderr, drawn only when stderr is a terminal (or forced).

    Quiet by default in logs and CI; `ISH_TF_PROGRESS=1` forces it on, `=0` off.
    """

    def __init__(self, total: int | None, desc: str = "", enabled: bool | None = None,
                 stream: IO = sys.stderr, min_interval: float = 0.2):
        env = os.environ.get("ISH_TF_PROGRESS")
        if enabled is None:
            enabled = env == "1" or (env != "0" and stream.isatty())
        self.total, self.desc, self.enabled, self.stream = total, desc, enabled, stream
        self.n, self.start, self._last, self.min_interval = 0, time.monotonic(), 0.0, min_interval

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if self.enabled and (now - self._last >= self.min_interval or self.n == self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.n / max(now - self.start, 1e-9)
        if self.total:
            frac = min(self.n / self.total, 1.0)
            bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            text = f"\r{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f}/s eta {eta:.0f}s"
        else:
            text = f"\r{self.desc} {self.n} {rate:.1f}/s"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "",
             enabled: bool | None = None) -> Iterator[T]:
    """Wraps an iterable with a `Progress` bar."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, enabled) as bar:
        for item in iterable:
            yield item
            bar.update()

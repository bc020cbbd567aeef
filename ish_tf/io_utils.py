"""Small I/O helpers shared by every stage: atomic writes and a quiet progress bar.

Every file a stage produces is written under a temporary name in the same directory
and renamed into place only once complete, so a crash or Ctrl-C never leaves a file
that a rerun would mistake for a finished one.

Paths may also be URLs of any filesystem `tf.io.gfile` supports (`gs://...`; see
`ish_tf.fs`): the temporary name is then made from a random suffix and the rename is
gfile's (a copy and a delete on object stores). Callers that must work on URLs write
through `atomic_open` (a file object), not through `atomic_path`'s temporary path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

from ish_tf import fs

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
    if fs.is_url(path):
        import uuid

        return fs.join(fs.dirname(path), f".{fs.basename(path)}.{uuid.uuid4().hex}{TMP_SUFFIX}")
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
    if fs.is_url(path):
        fs.makedirs(fs.dirname(path))
        tmp = tmp_path_for(path)
        try:
            yield tmp
            fs.replace(tmp, path)
        except BaseException:
            fs.remove(tmp)
            raise
        return
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
        if fs.is_url(tmp):  # gfile text is UTF-8, the only encoding used here
            with fs.open(tmp, mode) as f:
                yield f
            return
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
    if not fs.isdir(directory):
        return removed
    for name in fs.listdir(directory):
        if name.startswith(".") and name.endswith(TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                fs.remove(fs.join(directory, name), missing_ok=False)
                removed.append(name)
    return removed


# The progress bar moved to ish_tf.progress (steady lines where stderr is not a terminal);
# these names stay for the modules that import them from here.
from ish_tf.progress import Progress, progress  # noqa: E402,F401

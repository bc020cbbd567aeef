"""Paths that may be local or a URL of any filesystem `tf.io.gfile` supports.

A plain path (`/data/out`, `out/`) takes Python's own `os` calls, exactly as before, and
never imports TensorFlow. A URL (`gs://bucket/x`, `s3://...` where TensorFlow has the
plugin, `ram://x`: TensorFlow's in-process filesystem, used by the tests, or `file:///x`)
goes through `tf.io.gfile`, so a Beam pipeline's workers and its driver can share an
output on object storage, where no POSIX disk is shared.

On object stores a rename is a copy and a delete, not atomic: a reader may see the
destination before the source is gone, or a half-made destination if the copy dies. The
writers here therefore never let a file's *presence* mean "complete" on its own: the Beam
shard writer writes its completion marker (the per-shard result JSON) only after the
shard and its sidecar are in place, and the driver checks each shard's record count
before listing it in the index.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import io
import os
import posixpath
import re
import shutil
from collections.abc import Iterator
from typing import IO

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: str) -> bool:
    """True for `scheme://...` paths (taken through tf.io.gfile), False for plain paths."""
    return bool(_SCHEME.match(str(path)))


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def _errors():
    import tensorflow as tf

    return tf.errors


def _os_error(e: Exception, path: str) -> OSError:
    """A gfile error as the OSError the local path would raise (callers catch those)."""
    tf_errors = _errors()
    if isinstance(e, tf_errors.NotFoundError):
        return FileNotFoundError(errno.ENOENT, f"{e.message if hasattr(e, 'message') else e}",
                                 path)
    if isinstance(e, tf_errors.PermissionDeniedError):
        return PermissionError(errno.EACCES, str(getattr(e, "message", e)), path)
    return OSError(errno.EIO, str(getattr(e, "message", e)), path)


@contextlib.contextmanager
def _as_os_errors(path: str) -> Iterator[None]:
    tf_errors = _errors()
    try:
        yield
    except tf_errors.OpError as e:
        raise _os_error(e, path) from e


def join(base: str, *parts: str) -> str:
    """`os.path.join`, or a '/' join for URLs (whatever the local separator)."""
    if is_url(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def basename(path: str) -> str:
    return posixpath.basename(path) if is_url(path) else os.path.basename(path)


def abspath(path: str) -> str:
    """`os.path.abspath`; a URL is already absolute (and abspath would mangle it)."""
    return path if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    if is_url(path):
        return bool(_gfile().exists(path))
    return os.path.exists(path)


def isdir(path: str) -> bool:
    if is_url(path):
        return bool(_gfile().isdir(path))
    return os.path.isdir(path)


def isfile(path: str) -> bool:
    if is_url(path):
        g = _gfile()
        return bool(g.exists(path)) and not g.isdir(path)
    return os.path.isfile(path)


def getsize(path: str) -> int:
    if is_url(path):
        with _as_os_errors(path):
            return int(_gfile().stat(path).length)
    return os.path.getsize(path)


def makedirs(path: str) -> None:
    """`os.makedirs(path, exist_ok=True)`; on object stores, where directories are only
    name prefixes, gfile makes what the store needs."""
    if is_url(path):
        with _as_os_errors(path):
            _gfile().makedirs(path)
        return
    os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Entry names (gfile marks sub-directories of some stores with a trailing '/':
    stripped)."""
    if is_url(path):
        with _as_os_errors(path):
            return [n.rstrip("/") for n in _gfile().listdir(path)]
    return os.listdir(path)


def remove(path: str, missing_ok: bool = True) -> None:
    """Deletes a file; a missing one is fine unless `missing_ok=False`."""
    if is_url(path):
        g = _gfile()
        try:
            g.remove(path)
        except _errors().NotFoundError:
            if not missing_ok:
                raise FileNotFoundError(errno.ENOENT, "no such file", path) from None
        except _errors().OpError as e:
            raise _os_error(e, path) from e
        return
    try:
        os.remove(path)
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(path: str, ignore_errors: bool = False) -> None:
    """Deletes a directory tree (`shutil.rmtree`)."""
    if is_url(path):
        g = _gfile()
        try:
            if not g.exists(path):
                return
            try:
                g.rmtree(path)
            except _errors().NotFoundError:
                # Some stores (ram://) keep no entry for a directory made implicitly by
                # writing below it, and their recursive delete then fails: file by file.
                for root, _, names in g.walk(path, topdown=False):
                    for name in names:
                        remove(join(root, name))
                    with contextlib.suppress(_errors().OpError):
                        g.remove(root)
                if g.exists(path) and g.listdir(path):
                    raise
        except _errors().OpError as e:
            if not ignore_errors:
                raise _os_error(e, path) from e
        return
    shutil.rmtree(path, ignore_errors=ignore_errors)


def replace(src: str, dst: str) -> None:
    """`os.replace`; on URLs gfile's rename with overwrite (a copy and a delete on object
    stores: not atomic, see the module docstring)."""
    if is_url(src) or is_url(dst):
        with _as_os_errors(src):
            _gfile().rename(src, dst, overwrite=True)
        return
    os.replace(src, dst)


def open(path: str, mode: str = "r", encoding: str = "utf-8") -> IO:  # noqa: A001
    """`open(path, mode)` locally (text as `encoding`); `tf.io.gfile.GFile` on URLs
    (text is UTF-8 there). Binary modes take no encoding."""
    if is_url(path):
        if "r" in mode and not _gfile().exists(path):
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        with _as_os_errors(path):
            return _gfile().GFile(path, mode)
    if "b" in mode:
        return builtins.open(path, mode)
    return builtins.open(path, mode, encoding=encoding)


def read_bytes(path: str) -> bytes:
    with _as_os_errors(path) if is_url(path) else contextlib.nullcontext(), \
            open(path, "rb") as f:
        return f.read()


def readable(path: str) -> str | IO:
    """What Pillow, tifffile or pandas should open: the path itself when local (their own
    file handling, unchanged), else the whole file read into memory.

    A URL's bytes are read in one request (a `tf.io.gfile.GFile`) rather than handed to
    the decoder as a seekable remote file: decoders seek and read in small pieces, each
    of which would be a round trip to the store. Gfile errors come out as OSError with
    errno set, so the image readers' retry loop treats them as I/O errors.
    """
    if is_url(path):
        if not isfile(path):
            raise FileNotFoundError(errno.ENOENT, f"{path}: file not found", path)
        return io.BytesIO(read_bytes(path))
    return path

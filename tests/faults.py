"""Fault injection for reliability tests: slow servers, unwritable or full disks, bad bytes.

Every helper is local and unprivileged (no mounts, no root-only tricks), so the tests
that use them run the same on a laptop, in CI and in a container running as root:

* `trickling_server(...)`: an HTTP server on 127.0.0.1 that sends a body one byte every
  `interval` seconds (a per-read timeout never fires on it).
* `trickle(...)`: the same trickle, for a handler of your own server (the fake Allen
  API uses it for its "trickle:SECONDS" image fault).
* `failing_writes(monkeypatch, root, errno.ENOSPC)`: every attempt of this process to
  create, write, rename or make a directory under `root` fails with that errno
  (ENOSPC: a full disk; EROFS or EACCES: a read-only directory). It patches Python's
  file functions, so it sees writes of this process and its threads, not of children.
  A real small full filesystem needs a mount (root); a real read-only directory needs
  a non-root user (root ignores permission bits): `read_only_dir` gives one where it
  works and says so where it does not.
* `flip_bytes(path, ...)`: corrupts a file in place, seeded; `truncate(path, keep)` cuts
  it short, as a crash or a full disk mid-write leaves it.
* `failing_checkpoint_saves(monkeypatch, ...)`: TensorFlow writes checkpoints from C++,
  which `failing_writes` cannot see; this makes `tf.train.CheckpointManager.save` fail
  the way a full disk does, after a number of saves that succeed.
"""

from __future__ import annotations

import builtins
import contextlib
import errno as errno_lib
import os
import random
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# --------------------------------------------------------------------------- slow HTTP
def trickle(wfile, body: bytes, interval: float, stop: threading.Event | None = None) -> None:
    """Writes `body` one byte every `interval` seconds, until done, `stop` or a closed socket."""
    for i in range(len(body)):
        if stop is not None and stop.wait(interval):
            return
        if stop is None:
            time.sleep(interval)
        try:
            wfile.write(body[i:i + 1])
            wfile.flush()
        except OSError:  # the client gave up: that is what the tests want to see
            return


@contextlib.contextmanager
def trickling_server(body: bytes = b"x" * 10_000, interval: float = 0.5,
                     content_type: str = "image/jpeg") -> Iterator[str]:
    """An HTTP server on 127.0.0.1 whose every GET answers 200 and trickles `body`.

    The headers (with the full Content-Length) go out at once; then one byte every
    `interval` seconds. Leaving the block stops every trickle and closes the server.

    Yields:
      The base URL, e.g. ``http://127.0.0.1:PORT``.
    """
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
            pass

        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            trickle(self.wfile, body, interval, stop)
            self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    with serving(server, on_stop=stop.set) as url:
        yield url


@contextlib.contextmanager
def serving(server, on_stop: Callable[[], object] | None = None) -> Iterator[str]:
    """Runs an HTTP `server` bound to 127.0.0.1 in a thread; yields its base URL.

    Leaving the block calls `on_stop` (e.g. to end handlers still writing), then shuts the
    server down and closes it.
    """
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        if on_stop is not None:
            on_stop()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --------------------------------------------------------------------------- disks
def _under(path: object, root: str) -> bool:
    if isinstance(path, int) or path is None:
        return False
    try:
        full = os.path.abspath(os.fsdecode(path))
    except TypeError:
        return False
    return full == root or full.startswith(root + os.sep)


def failing_writes(monkeypatch, root: str, err: int = errno_lib.ENOSPC,
                   when: Callable[[str], bool] | None = None) -> None:
    """Makes every write of this process under `root` fail with OSError(`err`, ..., path).

    Patched: `open`/`os.open` for writing or creating, `os.replace`/`os.rename` into
    `root`, `os.mkdir`/`os.makedirs` of a new directory, `tempfile` (through `os.open`).
    Reads are untouched, so the inputs of a stage stay readable.

    Args:
      monkeypatch: pytest's monkeypatch (undone after the test).
      root: the directory that is "full" or "read-only".
      err: the errno: ENOSPC (full disk), EROFS (read-only filesystem), EACCES.
      when: optional filter on the path; only paths it accepts fail.
    """
    root = os.path.abspath(root)
    message = os.strerror(err)

    def hit(path) -> bool:
        return _under(path, root) and (when is None or when(os.path.abspath(os.fsdecode(path))))

    def fail(path):
        raise OSError(err, message, os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open
    real_replace, real_rename, real_mkdir = os.replace, os.rename, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if hit(file) and any(c in mode for c in "wax+"):
            fail(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        if hit(path) and writing:
            fail(path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_replace(src, dst, *args, **kwargs):
        if hit(dst):
            fail(dst)
        return real_replace(src, dst, *args, **kwargs)

    def fake_rename(src, dst, *args, **kwargs):
        if hit(dst):
            fail(dst)
        return real_rename(src, dst, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if hit(path) and not os.path.isdir(path):
            fail(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(os, "replace", fake_replace)
    monkeypatch.setattr(os, "rename", fake_rename)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)  # os.makedirs calls os.mkdir


def permissions_enforced(directory: str) -> bool:
    """Whether a mode-0555 directory really refuses this process's writes (not as root)."""
    probe = os.path.join(directory, ".perm_probe")
    os.makedirs(probe, exist_ok=True)
    os.chmod(probe, 0o555)
    try:
        with open(os.path.join(probe, "x"), "w"):
            pass
        return False
    except PermissionError:
        return True
    finally:
        os.chmod(probe, 0o755)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(probe, "x"))
        os.rmdir(probe)


@contextlib.contextmanager
def read_only_dir(path: str, monkeypatch) -> Iterator[str]:
    """`path` made read-only for this process for the block's duration.

    With permission bits where they are enforced (a normal user); as root, which ignores
    them (CI runs as root), by `failing_writes(..., EACCES)` through `monkeypatch`, so the
    fault is injected whoever runs the test.
    """
    os.makedirs(path, exist_ok=True)
    if permissions_enforced(os.path.dirname(os.path.abspath(path)) or "."):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, mode)
        return
    with monkeypatch.context() as m:
        failing_writes(m, path, errno_lib.EACCES)
        yield path


def failing_checkpoint_saves(monkeypatch, after: int = 0,
                             err: int = errno_lib.ENOSPC) -> list[str]:
    """Lets `after` checkpoint saves succeed, then fails every later one as a full disk
    (or another errno) makes TensorFlow fail: `tf.errors.ResourceExhaustedError` for
    ENOSPC, `PermissionDeniedError` for EACCES/EROFS, else `UnknownError`.

    Returns:
      The list the paths of the successful saves are appended to.
    """
    import tensorflow as tf

    real_save = tf.train.CheckpointManager.save
    saved: list[str] = []
    kind = {errno_lib.ENOSPC: tf.errors.ResourceExhaustedError,
            errno_lib.EACCES: tf.errors.PermissionDeniedError,
            errno_lib.EROFS: tf.errors.PermissionDeniedError}.get(err, tf.errors.UnknownError)

    def save(self, *args, **kwargs):
        if len(saved) >= after:
            raise kind(None, None, f"{self.directory}/ckpt-x.data-00000-of-00001.tempstate; "
                                   f"{os.strerror(err)}")
        path = real_save(self, *args, **kwargs)
        saved.append(path)
        return path

    monkeypatch.setattr(tf.train.CheckpointManager, "save", save)
    return saved


# --------------------------------------------------------------------------- bytes
def truncate(path: str, keep: int) -> int:
    """Cuts a file to its first `keep` bytes (negative: drops that many); returns the size."""
    size = os.path.getsize(path)
    keep = size + keep if keep < 0 else min(keep, size)
    os.truncate(path, keep)
    return keep


def flip_bytes(path: str, count: int = 16, seed: int = 0, start: int = 0,
               end: int | None = None) -> list[int]:
    """Inverts `count` bytes of a file at seeded offsets in [start, end); returns the offsets.

    `end=4` with `count=4` breaks any image's magic number (it no longer identifies);
    offsets further in leave a file that opens and fails, or not, on decoding.
    """
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        rng = random.Random(seed)
        stop = len(data) if end is None else min(end, len(data))
        span = range(min(start, stop), stop)
        offsets = sorted(rng.sample(span, min(count, len(span))))
        for k in offsets:
            data[k] ^= 0xFF
        f.seek(0)
        f.write(data)
    return offsets


def truncate_file(path: str, fraction: float = 0.5) -> int:
    """Cuts a file to `fraction` of its size (an interrupted copy or download); returns
    the new size."""
    size = int(os.path.getsize(path) * fraction)
    with open(path, "r+b") as f:
        f.truncate(size)
    return size

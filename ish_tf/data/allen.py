"""Allen Brain Atlas client: download a study's ISH section images and write their manifest.

Talks to the public API (https://api.brain-map.org) directly with `requests`; allensdk is
deliberately not used (its releases pin numpy<1.24 / pandas 1.5 and cannot live beside
TensorFlow 2.21).

The client is three modules:

* `ish_tf.data.allen_query`: RMA queries listing a study's SectionDataSets, page by page,
  and the manifest rows parsed from them.
* `ish_tf.data.allen_http`: sessions, errors and retries shared by queries and downloads.
* this module: ``/api/v2/image_download/{image_id}?downsample=N`` (a JPEG of the section
  image, each side halved N times) and the fetch run.

`fetch` turns one study (Human Cortex Study, Human Schizophrenia Study, adult Mouse) into
``OUT/images/{image_id}.jpg``, ``OUT/manifest.csv`` (see `ish_tf.data.manifest`) and
``OUT/failures.csv``. Downloads run on a bounded thread pool with retries (timeouts, 5xx,
429 with Retry-After), each image is streamed to a temporary name, decoded with Pillow and
only then renamed into place, so a rerun trusts every ``{image_id}.jpg`` it finds and
downloads only what is missing.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable

import pandas as pd
import requests
from PIL import Image

from ish_tf.data import manifest as manifest_lib
from ish_tf.data.allen_http import (
    FetchError,
    FetchInterrupted,
    RetryPolicy,
    TransientError,
    call_with_retries,
    checked_get,
    make_session,
)
from ish_tf.data.allen_query import (
    DEFAULT_API_URL,
    GENE_RE,
    GENES_PER_QUERY,
    MAX_PAGE_SIZE,
    STUDIES,
    AllenApiError,
    image_rows,
    iter_section_data_sets,
    parse_int,
)
from ish_tf.io_utils import Progress, atomic_path, remove_stale_tmp

log = logging.getLogger(__name__)

IMAGES_DIR = "images"
FAILURES_NAME = "failures.csv"
FAILURE_COLUMNS = ("image_id", "experiment_id", "stage", "reason")
_CHUNK_BYTES = 1 << 16
# Default deadline of one download attempt, in multiples of the per-read timeout: a
# section image (a few MB at downsample 2) takes seconds on a slow link, not minutes.
DEADLINE_TIMEOUTS = 10.0


class FetchRunError(FetchError, AllenApiError):
    """The run as a whole failed: every download failed, or OUT cannot be written.

    An `AllenApiError` too, so that callers catching the listing's errors (`bin/fetch`
    prints them as one ``fetch: error: ...`` line) catch these as well.
    """


def _write_error(e: OSError, where: str) -> FetchRunError:
    """One line naming the path that could not be written and the OS's reason."""
    path = e.filename if isinstance(e.filename, str) and e.filename else where
    return FetchRunError(f"{path}: cannot write ({e.strerror or e}); check that the "
                         f"directory is writable and its disk has space, then rerun to resume")


def _is_disk_error(e: BaseException) -> bool:
    """An OSError of the local file system (requests' errors are OSErrors too, not these)."""
    return (isinstance(e, OSError) and not isinstance(e, requests.RequestException)
            and e.errno is not None)


# --------------------------------------------------------------------------- config
@dataclasses.dataclass
class FetchConfig:
    """Everything `fetch` needs; built from flags by `ish_tf.cli.fetch.fetch_config`.

    Attributes:
      study: key of `STUDIES` (cortex | schizophrenia | mouse).
      out: output directory (images/, manifest.csv, failures.csv).
      api_url: API host, e.g. https://api.brain-map.org (tests use http://127.0.0.1:PORT).
      genes: gene acronyms to keep (empty: every gene of the study).
      max_images: keep only the first N images in (experiment id, image id) order; 0 = all.
      sections_per_experiment: keep only the N images of each experiment nearest the
        middle of its series (by section_number); 0 = all.
      downsample: image_download `downsample` (each side halved this many times).
      workers: concurrent downloads.
      plane: plane_of_section name to filter on; "" = the study's default, "any" = no filter.
      page_size: rows per RMA page (1..2000).
      retries: extra attempts after the first, for transient failures.
      backoff_base: first retry delay in seconds; doubles on each attempt.
      max_backoff: cap on one backoff delay, seconds.
      max_retry_after: cap on a server's Retry-After, seconds.
      timeout: connect/read timeout of one HTTP request, seconds (per read: a server
        trickling bytes never trips it; see `download_deadline`).
      download_deadline: most seconds one download attempt may take, headers to last
        byte; past it the attempt is abandoned and retried like a timeout. None = 10 x
        `timeout`; 0 = no deadline.
      flush_every: rewrite the manifest after this many newly completed images.
      flush_seconds: ...or after this many seconds, whichever comes first.
      progress: show a progress bar (None: only when stderr is a terminal).
    """

    study: str = "cortex"
    out: str = ""
    api_url: str = DEFAULT_API_URL
    genes: tuple[str, ...] = ()
    max_images: int = 0
    sections_per_experiment: int = 0
    downsample: int = 2
    workers: int = 4
    plane: str = ""
    page_size: int = 50
    retries: int = 5
    backoff_base: float = 1.0
    max_backoff: float = 60.0
    max_retry_after: float = 60.0
    timeout: float = 60.0
    download_deadline: float | None = None
    flush_every: int = 200
    flush_seconds: float = 30.0
    progress: bool | None = None

    def validate(self) -> None:
        """Checks every field; the message names the flag to fix.

        Raises:
          ValueError: a field is out of range or malformed.
        """
        if self.study not in STUDIES:
            raise ValueError(f"--study={self.study!r} is not one of {', '.join(sorted(STUDIES))}")
        if not self.out:
            raise ValueError("--out is required: the directory for images/, manifest.csv, failures.csv")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"--out={self.out!r} exists and is not a directory")
        if not re.match(r"^https?://[^/\s]+", self.api_url or ""):
            raise ValueError(f"--api_url={self.api_url!r} must look like http://host[:port]")
        for gene in self.genes:
            if not GENE_RE.match(gene):
                raise ValueError(
                    f"--genes: {gene!r} is not a gene acronym (letters, digits, '.', '-', '_', '@')")
        checks = [
            ("max_images", self.max_images >= 0, ">= 0 (0 = all)"),
            ("sections_per_experiment", self.sections_per_experiment >= 0, ">= 0 (0 = all)"),
            ("downsample", 0 <= self.downsample <= 10, "an integer in 0..10"),
            ("workers", 1 <= self.workers <= 64, "in 1..64"),
            ("page_size", 1 <= self.page_size <= MAX_PAGE_SIZE, f"in 1..{MAX_PAGE_SIZE}"),
            ("retries", self.retries >= 0, ">= 0"),
            ("backoff_base", self.backoff_base >= 0, ">= 0"),
            ("max_backoff", self.max_backoff >= 0, ">= 0"),
            ("max_retry_after", self.max_retry_after >= 0, ">= 0"),
            ("timeout", self.timeout > 0, "> 0"),
            ("download_deadline", self.download_deadline is None or self.download_deadline >= 0,
             ">= 0 (0 = none; unset = 10 x --timeout)"),
            ("flush_every", self.flush_every >= 1, ">= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"--{name}={getattr(self, name)!r} must be {want}")

    def resolved_download_deadline(self) -> float:
        """Seconds one download attempt may take; 0 = no deadline."""
        if self.download_deadline is None:
            return DEADLINE_TIMEOUTS * self.timeout
        return float(self.download_deadline)

    def resolved_plane(self) -> str | None:
        """The plane_of_section filter to apply, or None for all planes."""
        if self.plane == "":
            return STUDIES[self.study].default_plane
        return None if self.plane.lower() in ("any", "all") else self.plane


# --------------------------------------------------------------------------- URLs
def image_url(api_url: str, image_id: int, downsample: int) -> str:
    """Full URL of the image_download service for one section image."""
    return f"{api_url.rstrip('/')}/api/v2/image_download/{int(image_id)}?downsample={int(downsample)}"


# --------------------------------------------------------------------------- HTTP
class _SessionPool:
    """One `requests.Session` per thread (Session is not documented as thread-safe)."""

    def __init__(self, factory: Callable[[], requests.Session]):
        self._factory = factory
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._factory()
            self._local.session = session
            with self._lock:
                self._all.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            for session in self._all:
                session.close()
            self._all.clear()


# --------------------------------------------------------------------------- download
def download_image(session: requests.Session, url: str, dest: str, policy: RetryPolicy,
                   timeout: float = 60.0, stop: threading.Event | None = None,
                   deadline: float = 0.0) -> tuple[int, int]:
    """Streams one image to a temporary file, checks it decodes, renames it to `dest`.

    Truncated bodies (short of Content-Length, dropped connections) and undecodable bytes
    are retried like 5xx; 404 and other 4xx fail at once.

    Args:
      session: HTTP session of the calling thread.
      url: image_download URL.
      dest: final path; nothing is left there unless the image decoded.
      policy: retry policy.
      timeout: per-request timeout, seconds.
      stop: set to abort between chunks (the temporary file is removed).
      deadline: most seconds one attempt may take once the headers are in (a server
        sending one byte a second never trips the per-read `timeout`); the connection is
        then cut and the attempt retried like a timeout. 0 = no deadline.

    Returns:
      (width, height) of the decoded image.

    Raises:
      FetchError: permanent failure or retries exhausted.
      FetchInterrupted: `stop` was set.
    """
    stop = stop or threading.Event()

    def attempt() -> tuple[int, int]:
        resp = checked_get(session, url, timeout, stream=True)
        expired = threading.Event()
        with contextlib.closing(resp), atomic_path(dest) as tmp:
            expected = resp.headers.get("Content-Length")
            written = 0
            # A blocked read only returns when its socket is shut down: a watchdog does
            # that at the deadline, and the read's error is then reported as the deadline.
            watchdog = None
            if deadline > 0:
                watchdog = threading.Timer(deadline, _cut_connection, (resp, expired))
                watchdog.daemon = True
                watchdog.start()
            try:
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_content(_CHUNK_BYTES):
                        if stop.is_set():
                            raise FetchInterrupted("stopped")
                        f.write(chunk)
                        written += len(chunk)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.Timeout) as e:
                if expired.is_set():
                    raise TransientError(_deadline_reason(deadline, written)) from e
                raise TransientError(f"body cut off after {written} bytes ({type(e).__name__})") from e
            except Exception as e:
                if expired.is_set() and not isinstance(e, FetchInterrupted):
                    raise TransientError(_deadline_reason(deadline, written)) from e
                raise
            finally:
                if watchdog is not None:
                    watchdog.cancel()
            if expired.is_set():
                raise TransientError(_deadline_reason(deadline, written))
            if expected is not None and expected.isdigit() and written != int(expected):
                raise TransientError(f"body cut off: {written} of {expected} bytes")
            if written == 0:
                raise TransientError("empty body")
            try:
                with Image.open(tmp) as im:
                    im.load()  # a full decode: catches truncated or corrupt JPEG data
                    size = im.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise TransientError(f"not a decodable image ({e})") from e
        return size

    return call_with_retries(attempt, policy, url, stop)  # type: ignore[return-value]


def _cut_connection(resp: requests.Response, expired: threading.Event) -> None:
    """Marks the attempt expired and shuts its socket, which wakes a read blocked on it."""
    expired.set()
    conn = getattr(resp.raw, "connection", None) or getattr(resp.raw, "_connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()


def _deadline_reason(deadline: float, written: int) -> str:
    return f"download deadline of {deadline:g}s passed ({written} bytes received)"


def image_size(path: str, full_decode: bool) -> tuple[int, int] | None:
    """(width, height) of an image file, or None if it cannot be read.

    Args:
      path: image file.
      full_decode: decode all pixels (slow, catches truncation) instead of the header only.
    """
    try:
        with Image.open(path) as im:
            if full_decode:
                im.load()
            return im.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


# --------------------------------------------------------------------------- fetch
@dataclasses.dataclass
class FetchResult:
    """What a fetch did.

    Attributes:
      manifest_path: OUT/manifest.csv.
      failures_path: OUT/failures.csv.
      manifest: the manifest as written (every row, old and new).
      failures: this run's failures (image_id, experiment_id, stage, reason).
      listed: images the listing selected.
      downloaded: images downloaded this run.
      already_present: selected images found complete on disk.
      skipped_data_sets: data sets that could not be used (also in failures).
    """

    manifest_path: str
    failures_path: str
    manifest: pd.DataFrame
    failures: pd.DataFrame
    listed: int
    downloaded: int
    already_present: int
    skipped_data_sets: int


def list_images(config: FetchConfig, session: requests.Session | None = None,
                stop: threading.Event | None = None) -> tuple[list[dict], list[dict]]:
    """Lists the images a fetch would download, and the data sets it cannot use.

    Args:
      config: fetch configuration (study, genes, plane, max_images, paging, retries).
      session: HTTP session (a new one when None).
      stop: stop event.

    Returns:
      (rows, failures): manifest rows without width/height/path in (experiment id, image id)
      order, cut to `max_images`; failure records for unusable data sets.

    Raises:
      AllenApiError: the listing failed.
    """
    study = STUDIES[config.study]
    policy = _policy(config)
    own = session is None
    session = session or make_session(1)
    rows: list[dict] = []
    failures: list[dict] = []
    seen_sets: set[int] = set()
    # One ordered query can stop as soon as it has enough rows; several gene chunks cannot.
    early_stop = config.max_images > 0 and len(config.genes) <= GENES_PER_QUERY
    try:
        for ds in iter_section_data_sets(session, config.api_url, study, config.genes,
                                         config.resolved_plane(), config.page_size,
                                         config.timeout, policy, stop):
            try:
                ds_id = parse_int(ds["id"])
            except (KeyError, TypeError):
                failures.append({"image_id": None, "experiment_id": None, "stage": "list",
                                 "reason": f"data set without an id: {str(ds)[:120]!r}"})
                continue
            except ValueError:
                failures.append({"image_id": None, "experiment_id": None, "stage": "list",
                                 "reason": f"data set id {ds['id']!r} is not an integer: "
                                           f"{str(ds)[:120]!r}"})
                continue
            if ds_id in seen_sets:
                continue
            seen_sets.add(ds_id)
            ds_rows, problem = image_rows(ds, study, config.sections_per_experiment)
            if problem:
                # A data set left out entirely is "list"; some of its images left out, "image".
                failures.append({"image_id": None, "experiment_id": ds_id,
                                 "stage": "image" if ds_rows else "list",
                                 "reason": problem})
            rows.extend(ds_rows)
            if early_stop and len(rows) >= config.max_images:
                break
    finally:
        if own:
            session.close()
    rows.sort(key=lambda r: (r["experiment_id"], r["image_id"]))
    unique, seen_images = [], set()
    for r in rows:
        if r["image_id"] not in seen_images:
            seen_images.add(r["image_id"])
            unique.append(r)
    if config.max_images:
        unique = unique[:config.max_images]
    return unique, failures


def _policy(config: FetchConfig) -> RetryPolicy:
    return RetryPolicy(config.retries, config.backoff_base, config.max_backoff,
                       config.max_retry_after)


def _failures_frame(failures: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(failures, columns=list(FAILURE_COLUMNS))
    for col in ("image_id", "experiment_id"):
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    return df


class _Writer:
    """Writes manifest.csv (old rows merged with this run's) and failures.csv atomically."""

    def __init__(self, out: str, old: pd.DataFrame | None):
        self.manifest_path = os.path.join(out, manifest_lib.MANIFEST_NAME)
        self.failures_path = os.path.join(out, FAILURES_NAME)
        self.old = old

    def write(self, done: list[dict], failures: list[dict]) -> pd.DataFrame:
        new = pd.DataFrame(done, columns=list(manifest_lib.COLUMN_NAMES))
        old = self.old
        if old is not None and len(old):
            # An image that failed this run has no file any more: its old row would lie.
            failed_ids = {f["image_id"] for f in failures if f.get("image_id") is not None}
            old = old[~old["image_id"].isin(failed_ids)]
        merged = manifest_lib.merge_manifests(old, new) if old is not None else new
        try:
            written = manifest_lib.write_manifest(merged, self.manifest_path)
            with atomic_path(self.failures_path) as tmp:
                _failures_frame(failures).to_csv(tmp, index=False)
        except OSError as e:
            raise _write_error(e, os.path.dirname(self.manifest_path)) from e
        return written


def fetch(config: FetchConfig, stop: threading.Event | None = None,
          session_factory: Callable[[], requests.Session] | None = None) -> FetchResult:
    """Lists a study and downloads its images into `config.out`, resuming earlier runs.

    Writes OUT/images/{image_id}.jpg, OUT/manifest.csv (one row per image on disk, `path`
    relative to OUT; rows of earlier runs are kept) and OUT/failures.csv (what failed in
    this run). Images already on disk are not downloaded again. The manifest is rewritten
    every `flush_every` images / `flush_seconds`, and on Ctrl-C, so an interrupted run
    loses at most the images in flight.

    Args:
      config: what to fetch and how.
      stop: an event that stops the run like Ctrl-C (used by tests and embedding code).
      session_factory: makes one HTTP session per worker thread (default `make_session`).

    Returns:
      A `FetchResult`.

    Raises:
      ValueError: bad configuration (names the flag).
      ManifestError: an existing OUT/manifest.csv is unreadable (it is left untouched).
      AllenApiError: the listing failed (manifest.csv and failures.csv are not touched).
      FetchRunError: (an AllenApiError) every download failed (failures.csv says why),
        or a file under OUT could not be written (read-only, disk full; names the path).
      FetchInterrupted: stopped; completed images are in the manifest.
    """
    config.validate()
    stop = stop or threading.Event()
    out = os.path.abspath(config.out)
    images_dir = os.path.join(out, IMAGES_DIR)
    try:
        os.makedirs(images_dir, exist_ok=True)
        stale = remove_stale_tmp(images_dir) + remove_stale_tmp(out)
    except OSError as e:
        raise _write_error(e, images_dir) from e
    if stale:
        log.info("removed %d partial file(s) left by an interrupted run", len(stale))
    manifest_path = os.path.join(out, manifest_lib.MANIFEST_NAME)
    old = manifest_lib.read_manifest(manifest_path) if os.path.exists(manifest_path) else None
    old_ids = set(old["image_id"].tolist()) if old is not None else set()

    factory = session_factory or (lambda: make_session(2))
    sessions = _SessionPool(factory)
    writer = _Writer(out, old)
    policy = _policy(config)
    try:
        planned, failures = list_images(config, sessions.get(), stop)
        done: list[dict] = []
        todo: list[dict] = []
        for row in planned:
            dest = os.path.join(images_dir, f"{row['image_id']}.jpg")
            if os.path.exists(dest):
                # Files only ever appear through an atomic rename after a full decode, so a
                # header read is enough for images the manifest already knows; others (a
                # run killed before its manifest flush) are decoded fully to be sure.
                size = image_size(dest, full_decode=row["image_id"] not in old_ids)
                if size is not None:
                    done.append(_complete(row, size, dest, manifest_path, config.downsample))
                    continue
                log.warning("%s does not decode; downloading it again", dest)
                os.remove(dest)
            todo.append(row)
        already = len(done)
        downloaded = _download_all(config, todo, images_dir, manifest_path, sessions, policy,
                                   stop, done, failures, writer)
        manifest = writer.write(done, failures)
        failed = sum(1 for f in failures if f["stage"] == "download")
        if todo and downloaded == 0 and failed == len(todo):
            raise FetchRunError(
                f"every download failed ({failed} of {len(todo)} image(s)); the reasons are "
                f"in {writer.failures_path}")
    finally:
        sessions.close()
    return FetchResult(writer.manifest_path, writer.failures_path, manifest,
                       _failures_frame(failures), len(planned), downloaded, already,
                       sum(1 for f in failures if f["stage"] == "list"))


def _complete(row: dict, size: tuple[int, int], dest: str, manifest_path: str,
              downsample: int = 0) -> dict:
    """The manifest row of a downloaded image: its size, path and µm per pixel.

    The Allen API gives each section image's `resolution` (µm per pixel of the full scan)
    and full width; the downloaded image is that scan reduced 2^downsample times, so its
    scale is resolution x full width / downloaded width (resolution x 2^downsample where
    the full width is unknown).
    """
    from ish_tf.data.allen_query import FULL_WIDTH_KEY

    out = dict(row, width=int(size[0]), height=int(size[1]),
               path=manifest_lib.relative_image_path(manifest_path, dest))
    full_width = out.pop(FULL_WIDTH_KEY, None)
    um = out.get("um_per_pixel")
    if um is not None and not pd.isna(um):
        factor = full_width / size[0] if full_width and size[0] else 2 ** int(downsample)
        out["um_per_pixel"] = round(float(um) * factor, 6)
    return out


def _download_all(config: FetchConfig, todo: list[dict], images_dir: str, manifest_path: str,
                  sessions: _SessionPool, policy: RetryPolicy, stop: threading.Event,
                  done: list[dict], failures: list[dict], writer: _Writer) -> int:
    """Downloads `todo` on a thread pool, appending to `done`/`failures`; returns the count."""
    if not todo:
        return 0

    def work(row: dict) -> dict:
        dest = os.path.join(images_dir, f"{row['image_id']}.jpg")
        url = image_url(config.api_url, row["image_id"], config.downsample)
        size = download_image(sessions.get(), url, dest, policy, config.timeout, stop,
                              config.resolved_download_deadline())
        return _complete(row, size, dest, manifest_path, config.downsample)

    downloaded, since_flush, last_flush = 0, 0, time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers,
                                                 thread_name_prefix="allen-fetch")
    bar = Progress(len(todo), desc="fetch", enabled=config.progress, unit="images")
    futures: dict[concurrent.futures.Future, dict] = {}
    consumed: set[concurrent.futures.Future] = set()
    try:
        futures = {pool.submit(work, row): row for row in todo}
        for fut in concurrent.futures.as_completed(futures):
            consumed.add(fut)
            row = futures[fut]
            try:
                done.append(fut.result())
                downloaded += 1
                since_flush += 1
            except FetchInterrupted:
                continue
            except FetchError as e:
                failures.append({"image_id": row["image_id"], "experiment_id": row["experiment_id"],
                                 "stage": "download", "reason": str(e)})
                _log_failure(len(failures), row["image_id"], str(e))
            except Exception as e:  # noqa: BLE001 - one bad item must not stop the run
                if _is_disk_error(e):
                    # Not the image's fault: every other image would fail the same way.
                    with contextlib.suppress(OSError, FetchRunError):
                        writer.write(done, failures)
                    raise _write_error(e, images_dir) from e
                failures.append({"image_id": row["image_id"], "experiment_id": row["experiment_id"],
                                 "stage": "download", "reason": f"{type(e).__name__}: {e}"})
                _log_failure(len(failures), row["image_id"], f"{type(e).__name__}: {e}")
            bar.update()
            if since_flush >= config.flush_every or (
                    since_flush and time.monotonic() - last_flush >= config.flush_seconds):
                writer.write(done, failures)
                since_flush, last_flush = 0, time.monotonic()
        if stop.is_set():
            raise FetchInterrupted("stopped")
    except KeyboardInterrupt as e:
        # Ctrl-C (or `stop`): let in-flight downloads abort (their temporary files are
        # removed), then save every completed image before handing the interrupt on.
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        # Downloads that finished while we were being interrupted are on disk: record them.
        for fut in futures:
            if fut in consumed or not fut.done() or fut.cancelled():
                continue
            error = fut.exception()
            if error is None:
                done.append(fut.result())
                downloaded += 1
            elif isinstance(error, FetchError):
                row = futures[fut]
                failures.append({"image_id": row["image_id"], "experiment_id": row["experiment_id"],
                                 "stage": "download", "reason": str(error)})
        writer.write(done, failures)
        raise FetchInterrupted(
            f"interrupted after {downloaded} new image(s); {len(done)} complete images are in "
            f"{writer.manifest_path}; rerun the same command to resume") from e
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return downloaded


_MAX_LOGGED_FAILURES = 20


def _log_failure(n: int, image_id: int, reason: str) -> None:
    if n <= _MAX_LOGGED_FAILURES:
        log.warning("image %s failed: %s", image_id, reason)
    elif n == _MAX_LOGGED_FAILURES + 1:
        log.warning("more failures; see failures.csv")


def summary_lines(result: FetchResult) -> list[str]:
    """Short human-readable summary of a fetch for the CLI."""
    s = manifest_lib.summarize(result.manifest) if len(result.manifest) else None
    lines = [
        f"listed {result.listed} images; downloaded {result.downloaded}, "
        f"already present {result.already_present}, failed "
        f"{int((result.failures['stage'] != 'list').sum())}, unusable data sets "
        f"{result.skipped_data_sets}",
        f"manifest: {result.manifest_path} ({len(result.manifest)} rows"
        + (f", {s['genes']} genes, {s['donors']} donors, {s['experiments']} experiments)" if s else ")"),
        f"failures: {result.failures_path} ({len(result.failures)} rows)",
    ]
    return lines


def read_gene_list(value: str) -> tuple[str, ...]:
    """Gene acronyms from comma-separated text, or from a file when given as ``@path``.

    The file holds one acronym per line or comma-separated; ``#`` starts a comment.

    Raises:
      ValueError: the file cannot be read (the message names it).
    """
    text = value or ""
    if text.startswith("@"):
        path = text[1:]
        try:
            with open(path, encoding="utf-8") as f:
                text = ",".join(line.split("#", 1)[0] for line in f)
        except OSError as e:
            raise ValueError(f"--genes: cannot read gene list file {path!r} ({e})") from e
    genes = [g.strip() for g in re.split(r"[,\s]+", text) if g.strip()]
    return tuple(dict.fromkeys(genes))

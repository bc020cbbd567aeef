"""HTTP plumbing of the Allen Brain Atlas client: sessions, errors and retries with backoff.

Shared by the RMA queries (`ish_tf.data.allen_query`) and the image downloads
(`ish_tf.data.allen`). A request either succeeds, fails transiently (`TransientError`:
timeouts, dropped connections, 5xx, 429 with Retry-After; tried again by
`call_with_retries` with exponential backoff) or fails permanently (`FetchError`: 404
and other 4xx, or retries exhausted).
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import threading
import time
from collections.abc import Callable

import requests

from ish_tf import __version__

log = logging.getLogger(__name__)

USER_AGENT = f"ish_tf/{__version__} (gene-expression image representations; python-requests)"


class FetchError(RuntimeError):
    """One item could not be fetched after all retries (or failed permanently, e.g. 404)."""


class FetchInterrupted(KeyboardInterrupt):
    """Raised when a fetch is stopped (Ctrl-C or a stop event) after saving what completed."""


class TransientError(Exception):
    """A transient failure: the operation may be tried again, after `retry_after` if given."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient failures.

    Attributes:
      retries: attempts after the first.
      backoff_base: delay before the first retry, seconds; doubled each time.
      max_backoff: cap on one computed delay.
      max_retry_after: cap on a server-provided Retry-After.
    """

    retries: int = 5
    backoff_base: float = 1.0
    max_backoff: float = 60.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number `attempt + 1` (attempt counts from 0).

        A server's Retry-After wins over the computed backoff (it says when to come back),
        capped so a misbehaving server cannot park the run for hours.
        """
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return min(self.backoff_base * (2.0 ** attempt), self.max_backoff)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds a Retry-After header asks to wait (delta-seconds or HTTP-date), or None."""
    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(when.timestamp() - now, 0.0)


# --------------------------------------------------------------------------- HTTP
def make_session(pool_size: int = 4) -> requests.Session:
    """A `requests.Session` naming ish_tf in its User-Agent, with a pool sized for the workers.

    Sessions are not shared between threads (see `ish_tf.data.allen`'s session pool); timeouts are passed on
    each request because requests has no session-wide timeout.
    """
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size,
                                            max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _wait(seconds: float, stop: threading.Event) -> None:
    if seconds > 0 and stop.wait(seconds):
        raise FetchInterrupted("stopped")
    if stop.is_set():
        raise FetchInterrupted("stopped")


def call_with_retries(op: Callable[[], object], policy: RetryPolicy, what: str, stop: threading.Event):
    """Runs `op`, retrying on `TransientError` with backoff; returns its result.

    Raises:
      FetchError: still failing after `policy.retries` retries.
      FetchInterrupted: `stop` was set while waiting.
    """
    last: TransientError | None = None
    for attempt in range(policy.retries + 1):
        if stop.is_set():
            raise FetchInterrupted("stopped")
        try:
            return op()
        except TransientError as r:
            last = r
            if attempt == policy.retries:
                break
            wait = policy.delay(attempt, r.retry_after)
            log.debug("%s: %s; retry %d in %.2fs", what, r.reason, attempt + 1, wait)
            _wait(wait, stop)
    assert last is not None
    raise FetchError(f"{last.reason} (gave up after {policy.retries + 1} attempts)")


def checked_get(session: requests.Session, url: str, timeout: float,
                 stream: bool) -> requests.Response:
    """GET that sorts failures into transient (`TransientError`) and permanent (`FetchError`)."""
    try:
        resp = session.get(url, timeout=timeout, stream=stream)
    except requests.Timeout as e:
        raise TransientError(f"timeout after {timeout:g}s ({type(e).__name__})") from e
    except requests.ConnectionError as e:
        raise TransientError(f"connection error ({e})") from e
    code = resp.status_code
    if code == 429 or 500 <= code < 600:
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        resp.close()
        raise TransientError(f"HTTP {code} {resp.reason or ''}".strip(), retry_after)
    if code >= 400:
        resp.close()
        raise FetchError(f"HTTP {code} {resp.reason or ''}".strip())
    return resp


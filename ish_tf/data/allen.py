"""Allen Brain Atlas REST client: list ISH section data sets and download their section images.

Talks to the public API (http://api.brain-map.org) directly with `requests`; allensdk is
deliberately not used (its releases pin numpy<1.24 / pandas 1.5 and cannot live beside
TensorFlow 2.21).

Two services are used:

* RMA queries, ``/api/v2/data/query.json?criteria=model::SectionDataSet,...``, paged with
  ``rma::options[num_rows$eqN][start_row$eqS]`` until ``total_rows``. Every page comes in an
  envelope ``{"success", "id", "start_row", "num_rows", "total_rows", "msg"}`` where ``msg``
  holds the rows on success and the error text otherwise.
* ``/api/v2/image_download/{image_id}?downsample=N``: a JPEG of the section image, each
  side halved N times.

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
import email.utils
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import requests
from PIL import Image

from ish_tf import __version__
from ish_tf.data import manifest as manifest_lib
from ish_tf.io_utils import Progress, atomic_path, remove_stale_tmp

log = logging.getLogger(__name__)

DEFAULT_API_URL = "http://api.brain-map.org"
USER_AGENT = f"ish_tf/{__version__} (gene-expression image representations; python-requests)"
IMAGES_DIR = "images"
FAILURES_NAME = "failures.csv"
FAILURE_COLUMNS = ("image_id", "experiment_id", "stage", "reason")
# Allen's documented maximum page size for RMA queries.
MAX_PAGE_SIZE = 2000
# Gene lists are split over several queries so no URL grows past what proxies accept.
GENES_PER_QUERY = 100
_GENE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
_CHUNK_BYTES = 1 << 16


@dataclasses.dataclass(frozen=True)
class Study:
    """One Allen ISH product that `fetch` can list.

    Attributes:
      name: the `--study` value and the manifest's `study` column.
      product_id: Allen product id (`products[id$eq...]`).
      abbreviation: Allen product abbreviation, for messages.
      default_plane: plane_of_section name filtered on by default, or None for all.
      human: whether donors are people (diagnosis defaults to "control").
    """

    name: str
    product_id: int
    abbreviation: str
    default_plane: str | None
    human: bool


STUDIES: dict[str, Study] = {
    "cortex": Study("cortex", 9, "HumanCtx", None, True),
    "schizophrenia": Study("schizophrenia", 11, "HumanSZ", None, True),
    "mouse": Study("mouse", 1, "Mouse", "sagittal", False),
}


class AllenApiError(RuntimeError):
    """The API answered with something other than a usable page (the message quotes it)."""


class FetchError(RuntimeError):
    """One item could not be fetched after all retries (or failed permanently, e.g. 404)."""


class FetchInterrupted(KeyboardInterrupt):
    """Raised when a fetch is stopped (Ctrl-C or a stop event) after saving what completed."""


class _Retry(Exception):
    """A transient failure: the operation may be tried again, after `retry_after` if given."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# --------------------------------------------------------------------------- config
@dataclasses.dataclass
class FetchConfig:
    """Everything `fetch` needs; built from flags by `ish_tf.cli.fetch.fetch_config`.

    Attributes:
      study: key of `STUDIES` (cortex | schizophrenia | mouse).
      out: output directory (images/, manifest.csv, failures.csv).
      api_url: API host, e.g. http://api.brain-map.org (tests use http://127.0.0.1:PORT).
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
      timeout: connect/read timeout of one HTTP request, seconds.
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
            if not _GENE_RE.match(gene):
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
            ("flush_every", self.flush_every >= 1, ">= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"--{name}={getattr(self, name)!r} must be {want}")

    def resolved_plane(self) -> str | None:
        """The plane_of_section filter to apply, or None for all planes."""
        if self.plane == "":
            return STUDIES[self.study].default_plane
        return None if self.plane.lower() in ("any", "all") else self.plane


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


# --------------------------------------------------------------------------- URLs
def build_rma_criteria(product_id: int, genes: Sequence[str] = (), plane: str | None = None,
                       start_row: int = 0, num_rows: int = 50) -> str:
    """The `criteria` of an RMA query listing a product's section data sets, one page.

    Follows the documented grammar: ``model::SectionDataSet``, filters after
    ``rma::criteria`` (``[failed$eqfalse]``, ``products[id$eq...]``,
    ``genes[acronym$in'A','B']``, ``plane_of_section[name$eq'...']``), associations after
    ``rma::include`` and paging/order in ``rma::options``. Ordering by ``data_sets.id``
    makes pages stable, so paging neither repeats nor skips rows.

    Args:
      product_id: Allen product id (9 HumanCtx, 11 HumanSZ, 1 Mouse).
      genes: gene acronyms to keep; empty keeps all.
      plane: plane_of_section name (e.g. "sagittal"), or None for all.
      start_row: first row of the page (0-based).
      num_rows: rows per page.

    Returns:
      The criteria text, unescaped (requests percent-encodes what must be).

    Raises:
      ValueError: a gene or plane contains characters that would break the query.
    """
    for gene in genes:
        if not _GENE_RE.match(gene):
            raise ValueError(f"gene {gene!r} is not a gene acronym")
    if plane is not None and not re.match(r"^[A-Za-z -]+$", plane):
        raise ValueError(f"plane of section {plane!r} is not a plane name")
    filters = ["[failed$eqfalse]", f"products[id$eq{int(product_id)}]"]
    if genes:
        filters.append("genes[acronym$in" + ",".join(f"'{g}'" for g in genes) + "]")
    if plane:
        filters.append(f"plane_of_section[name$eq'{plane}']")
    include = "genes,plane_of_section,section_images,specimen(donor(age,conditions),structure)"
    options = f"[num_rows$eq{int(num_rows)}][start_row$eq{int(start_row)}][order$eq'data_sets.id']"
    return ("model::SectionDataSet,rma::criteria," + ",".join(filters)
            + ",rma::include," + include + ",rma::options" + options)


def query_url(api_url: str, criteria: str) -> str:
    """Full URL of an RMA JSON query."""
    return f"{api_url.rstrip('/')}/api/v2/data/query.json?criteria={criteria}"


def image_url(api_url: str, image_id: int, downsample: int) -> str:
    """Full URL of the image_download service for one section image."""
    return f"{api_url.rstrip('/')}/api/v2/image_download/{int(image_id)}?downsample={int(downsample)}"


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

    Sessions are not shared between threads (see `_SessionPool`); timeouts are passed on
    each request because requests has no session-wide timeout.
    """
    session = requests.Session()
    session.headers["User-Agent"] = USER_AGENT
    adapter = requests.adapters.HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size,
                                            max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


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


def _wait(seconds: float, stop: threading.Event) -> None:
    if seconds > 0 and stop.wait(seconds):
        raise FetchInterrupted("stopped")
    if stop.is_set():
        raise FetchInterrupted("stopped")


def _retrying(op: Callable[[], object], policy: RetryPolicy, what: str, stop: threading.Event):
    """Runs `op`, retrying on `_Retry` with backoff; returns its result.

    Raises:
      FetchError: still failing after `policy.retries` retries.
      FetchInterrupted: `stop` was set while waiting.
    """
    last: _Retry | None = None
    for attempt in range(policy.retries + 1):
        if stop.is_set():
            raise FetchInterrupted("stopped")
        try:
            return op()
        except _Retry as r:
            last = r
            if attempt == policy.retries:
                break
            wait = policy.delay(attempt, r.retry_after)
            log.debug("%s: %s; retry %d in %.2fs", what, r.reason, attempt + 1, wait)
            _wait(wait, stop)
    assert last is not None
    raise FetchError(f"{last.reason} (gave up after {policy.retries + 1} attempts)")


def _checked_get(session: requests.Session, url: str, timeout: float,
                 stream: bool) -> requests.Response:
    """GET that sorts failures into transient (`_Retry`) and permanent (`FetchError`)."""
    try:
        resp = session.get(url, timeout=timeout, stream=stream)
    except requests.Timeout as e:
        raise _Retry(f"timeout after {timeout:g}s ({type(e).__name__})") from e
    except requests.ConnectionError as e:
        raise _Retry(f"connection error ({e})") from e
    code = resp.status_code
    if code == 429 or 500 <= code < 600:
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        resp.close()
        raise _Retry(f"HTTP {code} {resp.reason or ''}".strip(), retry_after)
    if code >= 400:
        resp.close()
        raise FetchError(f"HTTP {code} {resp.reason or ''}".strip())
    return resp


# --------------------------------------------------------------------------- listing
def check_envelope(payload: object, expected_start: int, url: str) -> tuple[list[dict], int]:
    """Validates one RMA page and returns its rows and the query's total_rows.

    Args:
      payload: the decoded JSON body.
      expected_start: the start_row that was asked for.
      url: the query, quoted in errors.

    Returns:
      (rows, total_rows).

    Raises:
      AllenApiError: not an envelope, success is false (the message quotes `msg`), or the
        counts disagree with the rows.
    """
    if not isinstance(payload, dict) or "success" not in payload:
        raise AllenApiError(f"{url}: response is not an RMA envelope: {str(payload)[:200]!r}")
    if payload.get("success") is not True:
        raise AllenApiError(f"Allen API query failed: {payload.get('msg')!r} (query: {url})")
    rows = payload.get("msg")
    if not isinstance(rows, list):
        raise AllenApiError(f"{url}: envelope 'msg' is not a list of rows: {str(rows)[:200]!r}")
    try:
        start, num, total = (int(payload[k]) for k in ("start_row", "num_rows", "total_rows"))
    except (KeyError, TypeError, ValueError) as e:
        raise AllenApiError(f"{url}: envelope lacks start_row/num_rows/total_rows ({e})") from e
    if start != expected_start:
        raise AllenApiError(f"{url}: asked for start_row {expected_start}, got {start}")
    if num != len(rows):
        raise AllenApiError(f"{url}: envelope says num_rows={num} but holds {len(rows)} rows")
    return rows, total


def iter_section_data_sets(session: requests.Session, api_url: str, study: Study,
                           genes: Sequence[str] = (), plane: str | None = None,
                           page_size: int = 50, timeout: float = 60.0,
                           policy: RetryPolicy = RetryPolicy(),
                           stop: threading.Event | None = None) -> Iterator[dict]:
    """Yields every SectionDataSet of a study (with genes, donor, images), page by page.

    Args:
      session: HTTP session.
      api_url: API host.
      study: which product to list.
      genes: gene acronyms to keep (empty: all); long lists are split across queries.
      plane: plane_of_section filter or None.
      page_size: rows per page.
      timeout: per-request timeout, seconds.
      policy: retry policy for transient failures.
      stop: set to stop between requests.

    Yields:
      SectionDataSet dicts as the API returns them (JSON field names).

    Raises:
      AllenApiError: a page failed permanently or its envelope is not usable.
    """
    stop = stop or threading.Event()
    gene_chunks = [list(genes[i:i + GENES_PER_QUERY]) for i in range(0, len(genes), GENES_PER_QUERY)]
    for chunk in gene_chunks or [[]]:
        start = 0
        while True:
            url = query_url(api_url, build_rma_criteria(study.product_id, chunk, plane, start, page_size))

            def get_page(url=url, start=start):
                resp = _checked_get(session, url, timeout, stream=False)
                try:
                    payload = resp.json()
                except ValueError as e:
                    # A cut-off body is usually a dropped connection: worth another try.
                    raise _Retry(f"response is not JSON ({e})") from e
                return check_envelope(payload, start, url)

            try:
                rows, total = _retrying(get_page, policy, url, stop)
            except FetchError as e:
                raise AllenApiError(f"Allen API query failed: {e} (query: {url})") from e
            yield from rows
            start += len(rows)
            if start >= total:
                break
            if not rows:
                raise AllenApiError(
                    f"{url}: empty page at start_row {start} although total_rows={total}")


# --------------------------------------------------------------------------- rows
_AGE_UNITS_YEARS = {"yr": 1.0, "yrs": 1.0, "year": 1.0, "years": 1.0, "y": 1.0,
                    "mo": 1 / 12, "mos": 1 / 12, "month": 1 / 12, "months": 1 / 12,
                    "wk": 7 / 365.25, "wks": 7 / 365.25, "week": 7 / 365.25, "weeks": 7 / 365.25,
                    "pcw": 7 / 365.25,
                    "day": 1 / 365.25, "days": 1 / 365.25, "d": 1 / 365.25}


def parse_age_years(age: object) -> float | None:
    """Donor age in years from an Allen `age` object or its name.

    Uses ``age["days"]`` when present (mouse P56 -> 56 days), else parses the name:
    "42 yrs", "3 mos", "P56" (postnatal day), "E15.5" (embryonic day, negative age).

    Args:
      age: dict with `days`/`name`, a string name, or None.

    Returns:
      Age in years, or None when unknown.
    """
    if age is None:
        return None
    if isinstance(age, dict):
        days = age.get("days")
        if isinstance(days, (int, float)) and not isinstance(days, bool):
            years = float(days) / 365.25
            return -years if age.get("embryonic") and years > 0 else years
        return parse_age_years(age.get("name"))
    text = str(age).strip()
    m = re.fullmatch(r"([PE])(\d+(?:\.\d+)?)", text)
    if m:
        days = float(m.group(2)) / 365.25
        return -days if m.group(1) == "E" else days
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)\.?", text)
    if m and m.group(2).lower() in _AGE_UNITS_YEARS:
        return float(m.group(1)) * _AGE_UNITS_YEARS[m.group(2).lower()]
    return None


def normalize_sex(value: object) -> str:
    """M | F | unknown."""
    text = str(value or "").strip().lower()
    if text in ("m", "male"):
        return "M"
    if text in ("f", "female"):
        return "F"
    return "unknown"


def normalize_smoker(value: object) -> str:
    """yes | no | unknown from the API's boolean or free text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value or "").strip().lower()
    if text in ("yes", "y", "true", "smoker", "1", "current", "former"):
        return "yes"
    if text in ("no", "n", "false", "non-smoker", "nonsmoker", "never", "0"):
        return "no"
    return "unknown"


def diagnosis_from_conditions(conditions: object, human: bool) -> str | None:
    """The donor's diagnosis from its `conditions` list.

    "schizophrenia" when any condition names it; otherwise the condition names joined by
    ";"; "control" for a human donor with no condition (the Cortex Study's donors and
    HumanSZ controls); None for a mouse with none.
    """
    names = []
    for cond in conditions or []:
        name = cond.get("name") if isinstance(cond, dict) else cond
        if name and str(name).strip():
            names.append(str(name).strip().lower())
    if any("schizo" in n for n in names):
        return "schizophrenia"
    others = sorted({n for n in names if n not in ("control", "normal", "none")})
    if others:
        return ";".join(others)
    if names or human:
        return "control"
    return None


def _float_or_none(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def _int_or_none(value: object) -> int | None:
    f = _float_or_none(value)
    return int(f) if f is not None else None


def _structure_label(structure: object) -> str | None:
    if isinstance(structure, dict):
        for key in ("acronym", "name"):
            if structure.get(key):
                return str(structure[key])
    return None


def central_sections(images: list[dict], k: int) -> list[dict]:
    """The k section images nearest the middle of their series; all of them if k <= 0.

    The middle is the median `section_number` (series positions where any image lacks
    one); ties go to the lower section. Returned in the input's order.
    """
    if k <= 0 or len(images) <= k:
        return images
    numbers = [im.get("section_number") for im in images]
    if any(not isinstance(n, int) for n in numbers):
        numbers = list(range(len(images)))
    middle = float(np.median(numbers))
    chosen = set(sorted(range(len(images)), key=lambda i: (abs(numbers[i] - middle),
                                                           numbers[i]))[:k])
    return [im for i, im in enumerate(images) if i in chosen]


def image_rows(data_set: dict, study: Study,
               sections_per_experiment: int = 0) -> tuple[list[dict], str | None]:
    """Manifest rows (without width/height/path) for one SectionDataSet.

    Args:
      data_set: a SectionDataSet dict (JSON field names) including genes, specimen(donor,
        structure), plane_of_section and section_images.
      study: the study it came from.
      sections_per_experiment: keep only this many usable images, those nearest the
        middle of the series (`central_sections`); 0 keeps all.

    Returns:
      (rows, problem): one row per usable section image, sorted by image id, and None; or
      ([], reason) when the data set cannot be used (no gene, no donor, no images).
    """
    genes = data_set.get("genes") or []
    gene = genes[0] if genes and isinstance(genes[0], dict) else {}
    symbol = str(gene.get("acronym") or "").strip()
    if not symbol:
        return [], "data set has no gene acronym"
    specimen = data_set.get("specimen") or {}
    donor = specimen.get("donor") or {}
    donor_name = str(donor.get("name") or "").strip()
    if not donor_name:
        return [], "specimen has no donor name"
    images = [im for im in data_set.get("section_images") or []
              if isinstance(im, dict) and im.get("id") is not None and not im.get("failed")]
    if not images:
        return [], "data set has no usable section images"
    images = central_sections(images, sections_per_experiment)
    plane = data_set.get("plane_of_section")
    plane_name = plane.get("name") if isinstance(plane, dict) else plane
    entrez = gene.get("entrez_id")
    specimen_id = data_set.get("specimen_id") or specimen.get("id")
    base = {
        "experiment_id": int(data_set["id"]),
        "study": study.name,
        "gene_symbol": symbol,
        "entrez_id": _int_or_none(entrez),
        "specimen_id": _int_or_none(specimen_id),
        "donor_id": donor_name,
        "donor_sex": normalize_sex(donor.get("sex")),
        "donor_age": parse_age_years(donor.get("age")),
        "donor_race": donor.get("race_only") or donor.get("race") or None,
        "smoker": normalize_smoker(donor.get("smoker")),
        "diagnosis": diagnosis_from_conditions(donor.get("conditions"), study.human),
        "tissue_ph": _float_or_none(specimen.get("tissue_ph")),
        "pmi": _float_or_none(donor.get("pmi")),
        "plane_of_section": str(plane_name) if plane_name else None,
    }
    specimen_region = _structure_label(specimen.get("structure"))
    rows = []
    for im in sorted(images, key=lambda im: int(im["id"])):
        row = dict(base, image_id=int(im["id"]),
                   section_number=_int_or_none(im.get("section_number")))
        row["region"] = specimen_region or _structure_label(im.get("structure"))
        rows.append(row)
    return rows, None


# --------------------------------------------------------------------------- download
def download_image(session: requests.Session, url: str, dest: str, policy: RetryPolicy,
                   timeout: float = 60.0, stop: threading.Event | None = None) -> tuple[int, int]:
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

    Returns:
      (width, height) of the decoded image.

    Raises:
      FetchError: permanent failure or retries exhausted.
      FetchInterrupted: `stop` was set.
    """
    stop = stop or threading.Event()

    def attempt() -> tuple[int, int]:
        resp = _checked_get(session, url, timeout, stream=True)
        with contextlib.closing(resp), atomic_path(dest) as tmp:
            expected = resp.headers.get("Content-Length")
            written = 0
            try:
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_content(_CHUNK_BYTES):
                        if stop.is_set():
                            raise FetchInterrupted("stopped")
                        f.write(chunk)
                        written += len(chunk)
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.Timeout) as e:
                raise _Retry(f"body cut off after {written} bytes ({type(e).__name__})") from e
            if expected is not None and expected.isdigit() and written != int(expected):
                raise _Retry(f"body cut off: {written} of {expected} bytes")
            if written == 0:
                raise _Retry("empty body")
            try:
                with Image.open(tmp) as im:
                    im.load()  # a full decode: catches truncated or corrupt JPEG data
                    size = im.size
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise _Retry(f"not a decodable image ({e})") from e
        return size

    return _retrying(attempt, policy, url, stop)  # type: ignore[return-value]


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
                ds_id = int(ds["id"])
            except (KeyError, TypeError, ValueError):
                failures.append({"image_id": None, "experiment_id": None, "stage": "list",
                                 "reason": f"data set without an id: {str(ds)[:120]!r}"})
                continue
            if ds_id in seen_sets:
                continue
            seen_sets.add(ds_id)
            ds_rows, problem = image_rows(ds, study, config.sections_per_experiment)
            if problem:
                failures.append({"image_id": None, "experiment_id": ds_id, "stage": "list",
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
        written = manifest_lib.write_manifest(merged, self.manifest_path)
        with atomic_path(self.failures_path) as tmp:
            _failures_frame(failures).to_csv(tmp, index=False)
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
      FetchInterrupted: stopped; completed images are in the manifest.
    """
    config.validate()
    stop = stop or threading.Event()
    out = os.path.abspath(config.out)
    images_dir = os.path.join(out, IMAGES_DIR)
    os.makedirs(images_dir, exist_ok=True)
    stale = remove_stale_tmp(images_dir) + remove_stale_tmp(out)
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
                    done.append(_complete(row, size, dest, manifest_path))
                    continue
                log.warning("%s does not decode; downloading it again", dest)
                os.remove(dest)
            todo.append(row)
        already = len(done)
        downloaded = _download_all(config, todo, images_dir, manifest_path, sessions, policy,
                                   stop, done, failures, writer)
        manifest = writer.write(done, failures)
    finally:
        sessions.close()
    return FetchResult(writer.manifest_path, writer.failures_path, manifest,
                       _failures_frame(failures), len(planned), downloaded, already,
                       sum(1 for f in failures if f["stage"] == "list"))


def _complete(row: dict, size: tuple[int, int], dest: str, manifest_path: str) -> dict:
    return dict(row, width=int(size[0]), height=int(size[1]),
                path=manifest_lib.relative_image_path(manifest_path, dest))


def _download_all(config: FetchConfig, todo: list[dict], images_dir: str, manifest_path: str,
                  sessions: _SessionPool, policy: RetryPolicy, stop: threading.Event,
                  done: list[dict], failures: list[dict], writer: _Writer) -> int:
    """Downloads `todo` on a thread pool, appending to `done`/`failures`; returns the count."""
    if not todo:
        return 0

    def work(row: dict) -> dict:
        dest = os.path.join(images_dir, f"{row['image_id']}.jpg")
        url = image_url(config.api_url, row["image_id"], config.downsample)
        size = download_image(sessions.get(), url, dest, policy, config.timeout, stop)
        return _complete(row, size, dest, manifest_path)

    downloaded, since_flush, last_flush = 0, 0, time.monotonic()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.workers,
                                                 thread_name_prefix="allen-fetch")
    bar = Progress(len(todo), desc="fetch images", enabled=config.progress)
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


"""Allen Brain Atlas RMA queries: list a study's ISH section data sets and parse their rows.

``/api/v2/data/query.json?criteria=model::SectionDataSet,...`` is paged with
``rma::options[num_rows$eqN][start_row$eqS]`` until ``total_rows``. Every page comes in an
envelope ``{"success", "id", "start_row", "num_rows", "total_rows", "msg"}`` where ``msg``
holds the rows on success and the error text otherwise (`check_envelope`).

Each SectionDataSet (with its genes, donor, specimen and section images) becomes manifest
rows without width/height/path (`image_rows`); donor fields are normalised on the way
(`parse_age_years`, `normalize_sex`, `normalize_smoker`, `diagnosis_from_conditions`).
The downloads and the fetch run are in `ish_tf.data.allen`.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import requests

from ish_tf.data.allen_http import (
    FetchError,
    RetryPolicy,
    TransientError,
    call_with_retries,
    checked_get,
)

DEFAULT_API_URL = "https://api.brain-map.org"
# Allen's documented maximum page size for RMA queries.
MAX_PAGE_SIZE = 2000
# Gene lists are split over several queries so no URL grows past what proxies accept.
GENES_PER_QUERY = 100
GENE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")


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
        if not GENE_RE.match(gene):
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
        start, num, total = (parse_int(payload[k]) for k in ("start_row", "num_rows", "total_rows"))
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
                           policy: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, immutable
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
                resp = checked_get(session, url, timeout, stream=False)
                try:
                    payload = resp.json()
                except ValueError as e:
                    # A cut-off body is usually a dropped connection: worth another try.
                    raise TransientError(f"response is not JSON ({e})") from e
                return check_envelope(payload, start, url)

            try:
                rows, total = call_with_retries(get_page, policy, url, stop)
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


def parse_int(value: object) -> int:
    """An integer from JSON, checked as an integer: 12, 12.0, "12" and "12.0" are 12.

    Raises:
      ValueError: anything else (12.5, "7777777.9", "abc", True, None): ids are never
        truncated to the integer below them.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([+-]?\d+)(?:\.0*)?\s*", value)
        if m:
            return int(m.group(1))
    raise ValueError(f"{value!r} is not an integer")


def _int_or_none(value: object) -> int | None:
    """An optional integer field (entrez id, specimen id, section number); None if not one."""
    try:
        return parse_int(value)
    except ValueError:
        return None


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


# Transient key of listed rows (never written): the full-resolution scan's width.
FULL_WIDTH_KEY = "_full_width"


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
      ([], reason) when the data set cannot be used (no gene, no donor, no images); or
      (rows, reason) when some section images were skipped because their id is not an
      integer (the reason names each one).
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
    images, skipped = [], []
    for im in data_set.get("section_images") or []:
        if not isinstance(im, dict) or im.get("id") is None or im.get("failed"):
            continue
        try:
            images.append(dict(im, id=parse_int(im["id"])))
        except ValueError:
            where = (f" (section_number {im['section_number']!r})"
                     if im.get("section_number") is not None else "")
            skipped.append(f"section image id {im['id']!r}{where} is not an integer")
    problem = "; ".join(skipped) + " (skipped)" if skipped else None
    if not images:
        return [], problem or "data set has no usable section images"
    images = central_sections(images, sections_per_experiment)
    plane = data_set.get("plane_of_section")
    plane_name = plane.get("name") if isinstance(plane, dict) else plane
    entrez = gene.get("entrez_id")
    specimen_id = data_set.get("specimen_id") or specimen.get("id")
    base = {
        "experiment_id": parse_int(data_set["id"]),
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
    for im in sorted(images, key=lambda im: im["id"]):
        row = dict(base, image_id=im["id"],
                   section_number=_int_or_none(im.get("section_number")))
        # µm per pixel of the full-resolution scan and its width: bin/fetch turns them
        # into the downloaded image's scale (`allen._complete`).
        row["um_per_pixel"] = _float_or_none(im.get("resolution"))
        row[FULL_WIDTH_KEY] = _int_or_none(im.get("image_width") or im.get("width"))
        row["region"] = specimen_region or _structure_label(im.get("structure"))
        rows.append(row)
    return rows, problem

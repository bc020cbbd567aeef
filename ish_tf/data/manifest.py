"""The manifest: one row per section image, the spine every later table joins back to.

Both the Allen fetcher (`ish_tf.data.allen`) and the synthetic generator
(`ish_tf.data.synthetic`) write manifests through this module, and every reader
(`bin/extract`, evaluation) reads them through it, so nothing downstream can tell
the sources apart.

`path` is stored relative to the manifest's own directory when the image lies below
it, so a dataset directory can be moved or copied as a whole.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_path


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "int" (required integer), "Int" (nullable integer), "float", "str"
    required: bool
    doc: str


COLUMNS: tuple[Column, ...] = (
    Column("image_id", "int", True, "Unique section image id (Allen SectionImage id, or synthetic)."),
    Column("experiment_id", "int", True, "Section data set (experiment) the image belongs to."),
    Column("study", "str", True, "cortex | schizophrenia | mouse | synthetic | user label."),
    Column("gene_symbol", "str", True, "Gene symbol of the ISH probe, e.g. PVALB."),
    Column("entrez_id", "Int", False, "NCBI Entrez gene id, if known."),
    Column("specimen_id", "Int", False, "Allen specimen id."),
    Column("donor_id", "str", True, "Donor name, e.g. H08-0020."),
    Column("donor_sex", "str", False, "M | F | unknown."),
    Column("donor_age", "float", False, "Age in years (mouse: days converted to years)."),
    Column("donor_race", "str", False, "Race as given by the Allen API."),
    Column("smoker", "str", False, "yes | no | unknown."),
    Column("diagnosis", "str", False, "control | schizophrenia | ... (donor conditions)."),
    Column("tissue_ph", "float", False, "Tissue pH of the specimen."),
    Column("pmi", "float", False, "Post-mortem interval in hours."),
    Column("region", "str", False, "Brain structure the section was taken from."),
    Column("plane_of_section", "str", False, "coronal | sagittal | ..."),
    Column("section_number", "Int", False, "Position of the section in its series (Allen "
           "section_number), if known."),
    Column("um_per_pixel", "float", False, "Micrometres per pixel of the image as stored on "
           "disk (bin/fetch: Allen resolution x downsampling; bin/ingest: flag, table or "
           "TIFF metadata); lets bin/extract --source_um cut windows of one physical size."),
    Column("read_downsample", "Int", False, "Read the image reduced this many times per side "
           "(bin/ingest --downsample: a pyramid level, a reduced-scale JPEG decode) instead "
           "of at full resolution; width, height and um_per_pixel stay those of the file."),
    Column("width", "int", True, "Image width in pixels, as stored on disk."),
    Column("height", "int", True, "Image height in pixels, as stored on disk."),
    Column("path", "str", True, "Image file, relative to the manifest's directory."),
)

COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in COLUMNS)
REQUIRED: tuple[str, ...] = tuple(c.name for c in COLUMNS if c.required)
MANIFEST_NAME = "manifest.csv"


class ManifestError(ValueError):
    """A manifest that cannot be read or does not meet the schema; the message names the file."""


def _coerce(df: pd.DataFrame, source: str) -> pd.DataFrame:
    out = df.copy()
    for col in COLUMNS:
        if col.name not in out.columns:
            out[col.name] = pd.NA
        values = out[col.name]
        try:
            if col.kind == "int":
                numeric = pd.to_numeric(values, errors="raise")
                if numeric.isna().any():
                    row = int(np.flatnonzero(numeric.isna().to_numpy())[0])
                    raise ManifestError(
                        f"{source}: column '{col.name}' is empty in row {row + 2} (line of the CSV)")
                fractional = (numeric != np.floor(numeric)).to_numpy()
                if fractional.any():
                    # An id such as 7777777.9 must never become 7777777 silently.
                    row = int(np.flatnonzero(fractional)[0])
                    raise ManifestError(
                        f"{source}: column '{col.name}' must hold integers; row {row + 2} (line "
                        f"of the CSV) has {values.iloc[row]!r}")
                out[col.name] = numeric.astype("int64")
            elif col.kind == "Int":
                out[col.name] = pd.to_numeric(values, errors="raise").astype("Int64")
            elif col.kind == "float":
                out[col.name] = pd.to_numeric(values, errors="raise").astype("float64")
            else:
                # Empty text means unknown: store it as NA so a CSV round trip is lossless.
                text = values.astype("string").str.strip()
                out[col.name] = text.mask(text == "")
        except (ValueError, TypeError) as e:
            if isinstance(e, ManifestError):
                raise
            bad = _first_bad_row(values, col.kind)
            raise ManifestError(
                f"{source}: column '{col.name}' must hold {col.kind} values; "
                f"row {bad + 2} (line of the CSV) has {values.iloc[bad]!r}") from e
    extra = [c for c in out.columns if c not in COLUMN_NAMES]
    return out[list(COLUMN_NAMES) + extra]


def _first_bad_row(values: pd.Series, kind: str) -> int:
    for i, v in enumerate(values):
        if pd.isna(v):
            continue
        try:
            f = float(v)
            if kind in ("int", "Int") and f != int(f):
                return i
        except (TypeError, ValueError):
            return i
    return 0


def validate(df: pd.DataFrame, source: str = "<manifest>") -> pd.DataFrame:
    """Checks columns, types and unique image ids; returns a typed copy.

    Args:
      df: a manifest table.
      source: the file it came from, quoted in error messages.

    Returns:
      The manifest with schema columns first, in schema order, with their types.

    Raises:
      ManifestError: a required column is missing or empty, a value has the wrong
        type, or an image_id repeats.
    """
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{source}: missing required column(s) {', '.join(repr(m) for m in missing)}; "
            f"a manifest needs {', '.join(REQUIRED)}")
    out = _coerce(df, source)
    for name in ("gene_symbol", "donor_id", "path", "study"):
        empty = out[name].isna()
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise ManifestError(f"{source}: column '{name}' is empty in row {row + 2} (line of the CSV)")
    dup = out["image_id"].duplicated()
    if dup.any():
        raise ManifestError(
            f"{source}: image_id {int(out['image_id'][dup].iloc[0])} appears more than once")
    return out.reset_index(drop=True)


def read_manifest(path: str) -> pd.DataFrame:
    """Reads and validates a manifest CSV.

    Raises:
      ManifestError: the file is missing, unreadable or does not meet the schema;
        the message names the file and the column.
    """
    from ish_tf import fs

    if not fs.exists(path):
        raise ManifestError(f"{path}: manifest not found")
    try:
        df = pd.read_csv(fs.readable(path), dtype=str, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: cannot be read as CSV ({e})") from e
    return validate(df, source=path)


def write_manifest(df: pd.DataFrame, path: str) -> pd.DataFrame:
    """Validates and writes a manifest atomically (sorted by image_id); returns what was written."""
    out = validate(df, source=path).sort_values("image_id", kind="stable").reset_index(drop=True)
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False)
    return out


def merge_manifests(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """Union of two manifests keyed by image_id; rows of `new` win (used when resuming)."""
    if old is None or len(old) == 0:
        return new
    both = pd.concat([old[~old["image_id"].isin(new["image_id"])], new], ignore_index=True)
    return both.sort_values("image_id", kind="stable").reset_index(drop=True)


def image_path(manifest_path: str, row_path: str) -> str:
    """Absolute path of an image given the manifest's path and the row's `path` value.

    Either may be a URL (`ish_tf.fs`): a URL row is taken as it is; a relative row of a
    manifest at a URL lies below the manifest's "directory" there.
    """
    from ish_tf import fs

    if os.path.isabs(row_path) or fs.is_url(row_path):
        return row_path
    if fs.is_url(manifest_path):
        scheme, rest = manifest_path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(posixpath.dirname(rest), row_path))}"
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(manifest_path)), row_path))


def relative_image_path(manifest_path: str, image_file: str) -> str:
    """The `path` value to store for `image_file`: relative when it lies below the manifest's directory."""
    base = os.path.dirname(os.path.abspath(manifest_path))
    rel = os.path.relpath(os.path.abspath(image_file), base)
    return rel if not rel.startswith("..") else os.path.abspath(image_file)


def summarize(df: pd.DataFrame) -> dict:
    """Counts used by the quickstart and `bin/fetch` summaries."""
    per_gene = df.groupby("gene_symbol")["donor_id"].nunique()
    return {
        "images": int(len(df)),
        "genes": int(df["gene_symbol"].nunique()),
        "donors": int(df["donor_id"].nunique()),
        "experiments": int(df["experiment_id"].nunique()),
        "regions": sorted(str(r) for r in df["region"].dropna().unique()),
        "studies": sorted(str(s) for s in df["study"].dropna().unique()),
        "donors_per_gene_median": float(per_gene.median()) if len(per_gene) else 0.0,
    }

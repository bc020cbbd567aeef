"""Your own section images -> a manifest, so every later stage treats them as fetched ones.

Two ways to say what each image shows:

* a table (`table`): a CSV with a `path` column (relative to `images`, else to the
  table's own directory, or absolute) and `gene_symbol`, plus any manifest column
  (`donor_id`, `entrez_id`, `region`, `plane_of_section`, `diagnosis`, `donor_age`, ...)
  and any columns of your own, which are kept;
* a file name pattern (`name_pattern`): fields in braces are read from each image's path
  below `images`, e.g. ``{gene_symbol}/{donor_id}_*.jpg`` or ``{donor_id}-{gene_symbol}.tif``;
  ``*`` matches within one folder name, ``**`` across folders.

Each image is opened (its header only, `ish_tf.data.image_io.image_info`: pyramidal and
tiled TIFF/OME-TIFF, whole-slide files through openslide, images of any size) for its
width, height and, where the file records it, its micrometres per pixel. The scale
(`um_per_pixel`) comes from `um_per_pixel` (a flag, for every image), else the table's
column, else the file's metadata. `downsample` (or `target_um`, the reduction that brings
an image's scale closest to it from below) is recorded as `read_downsample`, the level
`bin/extract` reads: files are never rewritten. Files that are missing or
not images, names that do not match the pattern, and
table rows without a path or gene or repeating an image are written to OUT/skipped.csv
with the reason; the rest go on. Ids are stable: `image_id` is a hash
of the image's path (as given, relative to `images`), `experiment_id` one of (study,
gene, donor), unless the table gives them, so adding images and rerunning keeps the ids
(and so the resumable extraction) of the others.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import logging
import os
import re

import pandas as pd

from ish_tf.data import manifest as manifest_lib
from ish_tf.io_utils import atomic_path, progress

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".btf", ".svs", ".ndpi",
                    ".mrxs", ".scn", ".bif")
SKIPPED_NAME = "skipped.csv"
# Filled in here, never read from a table or a pattern.
_MEASURED = ("width", "height")


class IngestError(ValueError):
    """Input that cannot be ingested at all; the message names the file, column or flag."""


@dataclasses.dataclass(frozen=True)
class IngestConfig:
    """What `ingest` reads and writes.

    Attributes:
      out: directory for manifest.csv and skipped.csv.
      images: folder of the images (searched recursively with `name_pattern`; the base
        of a table's relative paths). Required with `name_pattern`.
      table: CSV of the images (see the module doc); exactly one of table, name_pattern.
      name_pattern: file name pattern with {column} fields (see the module doc).
      study: the manifest's `study` where the table gives none.
      default_donor: `donor_id` where neither the table nor the pattern gives one.
      workers: threads reading image headers.
      um_per_pixel: micrometres per pixel of every image (0 = from the table's column or
        the files' metadata, where present).
      downsample: record that images are read reduced this many times per side (1 = full
        resolution).
      target_um: instead of `downsample`: per image, the largest integer reduction whose
        scale stays at or below this many µm per pixel (needs the image's scale; 0 = off).
    """

    out: str
    images: str = ""
    table: str = ""
    name_pattern: str = ""
    study: str = "user"
    default_donor: str = "unknown"
    workers: int = 4
    um_per_pixel: float = 0.0
    downsample: int = 1
    target_um: float = 0.0

    def validate(self) -> IngestConfig:
        if self.um_per_pixel < 0 or self.target_um < 0:
            raise IngestError("--um_per_pixel and --target_um must be >= 0")
        if self.downsample < 1:
            raise IngestError(f"--downsample must be >= 1, got {self.downsample}")
        if self.downsample > 1 and self.target_um:
            raise IngestError("give --downsample or --target_um, not both")
        if not self.out:
            raise IngestError("--out is required: the directory to write manifest.csv to")
        if bool(self.table) == bool(self.name_pattern):
            raise IngestError("give exactly one of --table (a CSV of path, gene_symbol, ...) "
                              "and --name_pattern (e.g. '{gene_symbol}/{donor_id}_*.jpg')")
        if self.name_pattern and not self.images:
            raise IngestError("--name_pattern needs --images, the folder to search")
        if self.images and not os.path.isdir(self.images):
            raise IngestError(f"--images={self.images}: not a directory")
        if self.table and not os.path.isfile(self.table):
            raise IngestError(f"--table={self.table}: file not found")
        if not self.study.strip():
            raise IngestError("--study_label must not be empty")
        if self.workers < 1:
            raise IngestError(f"--workers must be >= 1, got {self.workers}")
        return self


@dataclasses.dataclass
class IngestResult:
    manifest: pd.DataFrame
    skipped: pd.DataFrame  # path, kind (no_match, no_path, no_gene_symbol, duplicate,
    #                        missing, unreadable), reason
    manifest_path: str
    skipped_path: str  # "" when nothing was skipped


def stable_id(*parts: str) -> int:
    """A positive id below 2**48 from text: the same text gives the same id on any machine."""
    digest = hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()
    return int(digest[:12], 16) or 1


def pattern_regex(pattern: str) -> tuple[re.Pattern, list[str]]:
    """Compiles a name pattern: {column} fields, * (within a folder), ** (across folders).

    Raises:
      IngestError: a field is not a manifest column one may set, repeats, or gene_symbol
        is missing.
    """
    settable = [c for c in manifest_lib.COLUMN_NAMES if c not in (*_MEASURED, "path")]
    out, fields, pos = [], [], 0
    for m in re.finditer(r"\{([^{}]*)\}|\*\*|\*", pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        token = m.group(0)
        if token == "**":
            out.append(".*")
        elif token == "*":
            out.append("[^/]*")
        else:
            name = m.group(1).strip()
            if name not in settable:
                raise IngestError(f"--name_pattern={pattern!r}: unknown field {{{name}}}; fields "
                                  f"are manifest columns: {', '.join(settable)}")
            if name in fields:
                raise IngestError(f"--name_pattern={pattern!r}: field {{{name}}} appears twice")
            fields.append(name)
            out.append(f"(?P<{name}>[^/]+?)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    if "gene_symbol" not in fields:
        raise IngestError(f"--name_pattern={pattern!r} has no {{gene_symbol}} field")
    return re.compile("".join(out)), fields


def _rows_from_pattern(config: IngestConfig) -> tuple[pd.DataFrame, list[dict]]:
    regex, fields = pattern_regex(config.name_pattern)
    rows, skipped = [], []
    for root, dirs, files in os.walk(config.images):
        dirs.sort()
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            rel = os.path.relpath(os.path.join(root, name), config.images).replace(os.sep, "/")
            m = regex.fullmatch(rel)
            if m is None:
                skipped.append({"path": rel, "kind": "no_match",
                                "reason": f"does not match --name_pattern={config.name_pattern}"})
                continue
            rows.append({"path": rel, **{k: m.group(k) for k in fields}})
    return pd.DataFrame(rows, columns=["path", *fields]), skipped


def _read_table(config: IngestConfig) -> pd.DataFrame:
    try:
        df = pd.read_csv(config.table, dtype=str, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise IngestError(f"{config.table}: cannot be read as CSV ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda col: col.str.strip()).mask(lambda d: d == "")  # blank = missing
    for col in ("path", "gene_symbol"):
        if col not in df.columns:
            raise IngestError(f"{config.table}: no '{col}' column (columns: {', '.join(df.columns)}); "
                              "a table needs path and gene_symbol")
    measured = [c for c in _MEASURED if c in df.columns]
    if measured:
        logging.warning("%s: column(s) %s are ignored: read from the image files",
                        config.table, ", ".join(measured))
        df = df.drop(columns=measured)
    if "image_id" in df.columns and df["image_id"].isna().any() and df["image_id"].notna().any():
        raise IngestError(f"{config.table}: column 'image_id' is filled in some rows only; fill "
                          "it in every row or leave it out (ids are then derived from the paths)")
    # Typed columns checked now, so that an error names the table's own line: the
    # columns filled in later get valid stand-ins.
    probe = df.copy()
    probe["width"] = probe["height"] = "1"
    stand_ins = pd.Series([str(10**15 + i) for i in range(len(df))], index=df.index)
    for col, default in (("image_id", stand_ins), ("experiment_id", "1"), ("path", "x"),
                         ("gene_symbol", "x"), ("study", config.study),
                         ("donor_id", config.default_donor)):
        probe[col] = probe[col].fillna(default) if col in probe.columns else default
    try:
        manifest_lib.validate(probe, source=config.table)
    except manifest_lib.ManifestError as e:
        raise IngestError(str(e)) from e
    return df


def _image_size(path: str) -> tuple[int, int, float | None] | tuple[str, str]:
    """(width, height, µm/px or None) from the header, or (kind, reason) where the file
    cannot be used."""
    from ish_tf.data import image_io

    if not os.path.isfile(path):
        return "missing", f"{path}: file not found"
    try:
        info = image_io.image_info(path)
    except (image_io.ImageReadError, OSError, ValueError, SyntaxError) as e:
        return "unreadable", f"{path}: not a readable image ({e})"
    return info.width, info.height, info.um_per_pixel


def _set_scale(df: pd.DataFrame, from_files: list, config: IngestConfig) -> None:
    """Fills um_per_pixel (flag, else table column, else file metadata) and
    read_downsample (--downsample, or from --target_um and the scale) in place."""
    if config.um_per_pixel:
        df["um_per_pixel"] = config.um_per_pixel
    else:
        given = (pd.to_numeric(df["um_per_pixel"], errors="coerce") if "um_per_pixel" in df.columns
                 else pd.Series(float("nan"), index=df.index))
        files = pd.Series([float("nan") if v is None else float(v) for v in from_files],
                          index=df.index)
        um = given.where(given > 0, files)
        if um.notna().any():
            df["um_per_pixel"] = um.round(6)
    if config.downsample > 1:
        df["read_downsample"] = config.downsample
    elif config.target_um:
        um = (pd.to_numeric(df["um_per_pixel"], errors="coerce") if "um_per_pixel" in df.columns
              else pd.Series(float("nan"), index=df.index))
        unknown = df.loc[um.isna(), "path"].tolist()
        if unknown:
            raise IngestError(f"--target_um={config.target_um:g} needs each image's scale; "
                              f"{len(unknown)} image(s) have none (first: {unknown[0]}); give "
                              "--um_per_pixel or a um_per_pixel column")
        df["read_downsample"] = [max(1, int(config.target_um // u + 1e-9)) for u in um]


def ingest(config: IngestConfig) -> IngestResult:
    """Writes OUT/manifest.csv (and OUT/skipped.csv) for a folder or table of images.

    Raises:
      IngestError: bad configuration, an unreadable table or one without path and
        gene_symbol, a typed column with a wrong value (naming the line), clashing
        image ids, or no usable image at all.
    """
    config.validate()
    os.makedirs(config.out, exist_ok=True)
    manifest_path = os.path.join(config.out, manifest_lib.MANIFEST_NAME)
    if config.table:
        df = _read_table(config)
        base = config.images or os.path.dirname(os.path.abspath(config.table))
        lines = pd.Series(range(2, len(df) + 2), index=df.index)  # CSV line of each row
        skipped = []
    else:
        df, skipped = _rows_from_pattern(config)
        base = config.images
        lines = None
    source = config.table or config.images

    # Blank cells are missing (the table reader strips them; pattern fields are never empty).
    keep = pd.Series(True, index=df.index)
    for col in ("path", "gene_symbol"):
        empty = df[col].isna()
        for i in df.index[empty & keep]:
            skipped.append({"path": "" if pd.isna(df.at[i, "path"]) else df.at[i, "path"],
                            "kind": f"no_{col}",
                            "reason": f"{source} line {lines[i]}: empty {col}"})
        keep &= ~empty
    df = df[keep].copy()
    files = [p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p)) for p in df["path"]]
    df["_file"] = files
    # Only a table can name a file twice (a folder walk lists each file once).
    first_row: dict[str, int] = {}
    dup = pd.Series(False, index=df.index)
    for i, f in zip(df.index, df["_file"], strict=True):
        if f in first_row:
            dup[i] = True
            skipped.append({"path": df.at[i, "path"], "kind": "duplicate",
                            "reason": f"{source} line {lines[i]} repeats line "
                                      f"{lines[first_row[f]]}: same image"})
        else:
            first_row[f] = i
    df = df[~dup]

    with concurrent.futures.ThreadPoolExecutor(config.workers) as pool:
        sizes = list(progress(pool.map(_image_size, df["_file"]), total=len(df),
                              desc="ingest: reading image headers"))
    ok = [isinstance(s[0], int) for s in sizes]
    for path, size, good in zip(df["path"], sizes, ok, strict=True):
        if not good:
            skipped.append({"path": path, "kind": size[0], "reason": size[1]})
    df = df[ok].copy()
    if df.empty:
        raise IngestError(f"{source}: no usable image ({len(skipped)} skipped; first: "
                          f"{skipped[0]['reason'] if skipped else 'none found'})")
    good = [s for s, g in zip(sizes, ok, strict=True) if g]
    df["width"] = [s[0] for s in good]
    df["height"] = [s[1] for s in good]
    _set_scale(df, [s[2] for s in good], config)

    for col, default in (("study", config.study), ("donor_id", config.default_donor)):
        if col not in df.columns:
            if col == "donor_id":
                logging.warning("%s: no donor_id; every image gets donor_id %r (--default_donor)",
                                source, default)
            df[col] = default
        df[col] = df[col].fillna(default)
    if not ("image_id" in df.columns and df["image_id"].notna().all()):
        # The path as given (normalised), relative to `base` unless absolute.
        df["image_id"] = [stable_id("image", p if os.path.isabs(p)
                                    else os.path.normpath(p).replace(os.sep, "/"))
                          for p in df["path"]]
    if "experiment_id" not in df.columns or df["experiment_id"].isna().any():
        derived = [stable_id("experiment", str(s), str(g), str(d))
                   for s, g, d in zip(df["study"], df["gene_symbol"], df["donor_id"], strict=True)]
        given = df["experiment_id"] if "experiment_id" in df.columns else pd.Series(pd.NA, index=df.index)
        df["experiment_id"] = [g if not pd.isna(g) else d for g, d in zip(given, derived, strict=True)]
    clash = df["image_id"].astype(str).duplicated(keep=False)
    if clash.any():
        rows = df[clash].sort_values("image_id")
        raise IngestError(f"{source}: image_id {rows['image_id'].iloc[0]} is used by "
                          f"{', '.join(rows['path'].head(3))}")
    df["path"] = [manifest_lib.relative_image_path(manifest_path, f) for f in df["_file"]]
    df = df.drop(columns=["_file"])
    try:
        written = manifest_lib.write_manifest(df, manifest_path)
    except manifest_lib.ManifestError as e:
        raise IngestError(str(e)) from e

    skipped_df = pd.DataFrame(skipped, columns=["path", "kind", "reason"])
    skipped_path = os.path.join(config.out, SKIPPED_NAME)
    if len(skipped_df):
        with atomic_path(skipped_path) as tmp:
            skipped_df.to_csv(tmp, index=False)
    else:
        if os.path.exists(skipped_path):
            os.remove(skipped_path)  # from an earlier run; nothing is skipped now
        skipped_path = ""
    return IngestResult(written, skipped_df, manifest_path, skipped_path)

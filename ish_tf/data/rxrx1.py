"""The RxRx1 layouts (schema) and `bin/ingest --layout=rxrx1` (reader): one manifest row
per imaged site.

Interface (stable; `ish_tf.data.plate_records`, the mean-teacher family and its
quickstart build on it)::

    result = ingest_rxrx1(Rxrx1IngestConfig(images=ROOT, out=DIR))  # -> Rxrx1IngestResult
    df = read_manifest(DIR + "/manifest.csv")      # typed, validated (MANIFEST_COLUMNS)
    is_rxrx1_manifest(path) -> bool                # what bin/extract checks
    channel_paths(df, manifest_path) -> (n, 6) absolute paths
    load_site(paths) -> uint8 (H, W, 6)
    parse_tfrecord_example(serialized) / make_tfrecord_example(...)   # rxrx1-utils records

The three layouts `ingest_rxrx1` reads (found from what ROOT holds):

- **challenge** (the Kaggle CellSignal competition, 2019):
  ``ROOT/{train,test}/{experiment}/Plate{p}/{well}_s{site}_w{channel}.png`` with
  ``ROOT/train.csv`` (id_code, experiment, plate, well, sirna), ``ROOT/test.csv``
  (id_code, experiment, plate, well; no labels), ``ROOT/train_controls.csv`` and
  ``ROOT/test_controls.csv`` (id_code, experiment, plate, well, sirna, well_type).
  Sites are those found on disk for each well.
- **released** (rxrx.ai, 2020): ``ROOT/images/{experiment}/Plate{p}/{well}_s{site}_w{c}.png``
  with ``ROOT/metadata.csv`` (site_id, well_id, cell_type, dataset, experiment, plate,
  well, site, well_type, sirna, sirna_id): one row per site; ``sirna_id`` is the class,
  ``sirna`` its ThermoFisher name.
- **tfrecords** (rxrx1-utils' `images2tfrecords`): GZIP TFRecords (``*.tfrecord``, any
  depth below ROOT) of `tf.train.Example`s with `TFRECORD_FEATURES`: ``image`` the raw
  uint8 (512, 512, 6) pixels (channels last), ``experiment``, ``plate``, ``well``,
  ``site``, ``cell_type``, ``well_type`` and ``sirna`` (absent where unknown). The sites
  are unpacked into ``OUT/images/{experiment}/Plate{p}/{well}_s{site}_w{c}.png``
  (lossless, 8-bit) so that every later stage reads one layout; that costs about the
  PNGs' size on disk. A site found twice (rxrx1-utils writes each strategy's copy) is
  kept once, the copy listed in skipped.csv.

The manifest (`MANIFEST_COLUMNS`): image_id, site_id, id_code, dataset (train/test),
experiment, plate, well, site, cell_type (the experiment's prefix), well_type
(treatment, positive_control, negative_control), sirna (the class id; empty where
unlabelled), sirna_name, height, width and path_w1 .. path_w6 (relative to the
manifest's folder when below it). Sites with a missing or unreadable channel (a PNG
header is read; 8-bit grayscale expected; all six the same size), wells without
images and images without a metadata row go to skipped.csv (source, kind, reason,
experiment, plate, well, site). A bad table stops ingest with a message naming the
file, its line and the column.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import struct
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_write_text

N_CHANNELS = 6
CHANNEL_COLUMNS: tuple[str, ...] = tuple(f"path_w{c}" for c in range(1, N_CHANNELS + 1))
WELL_TYPES: tuple[str, ...] = ("treatment", "positive_control", "negative_control")
DATASETS: tuple[str, ...] = ("train", "test")
LAYOUTS: tuple[str, ...] = ("challenge", "released", "tfrecords")
MANIFEST_NAME = "manifest.csv"
SKIPPED_NAME = "skipped.csv"

#: Manifest column -> (kind, doc). kind: "int", "Int" (nullable), "str".
MANIFEST_COLUMNS: dict[str, tuple[str, str]] = {
    "image_id": ("int", "Unique id of the site (row order of the sorted manifest)."),
    "site_id": ("str", "{experiment}_{plate}_{well}_{site}."),
    "id_code": ("str", "The well: {experiment}_{plate}_{well}."),
    "dataset": ("str", "train | test (the RxRx1 split; test wells may be unlabelled)."),
    "experiment": ("str", "Experiment (batch), e.g. HEPG2-01."),
    "plate": ("int", "Plate number within the experiment (1..4 in RxRx1)."),
    "well": ("str", "Well on the plate, e.g. B02."),
    "site": ("int", "Imaged site within the well (1 or 2 in RxRx1)."),
    "cell_type": ("str", "Cell type: the experiment's prefix (HEPG2, HUVEC, RPE, U2OS)."),
    "well_type": ("str", "treatment | positive_control | negative_control."),
    "sirna": ("Int", "Class id (RxRx1 sirna / sirna_id, 0..1138); empty where unlabelled."),
    "sirna_name": ("str", "siRNA name (the released metadata's sirna), where known."),
    "height": ("int", "Site height in pixels."),
    "width": ("int", "Site width in pixels."),
    **{c: ("str", f"Channel w{c[-1]} PNG, relative to the manifest's folder.")
       for c in CHANNEL_COLUMNS},
}

#: Tables of the challenge layout: file -> (dataset, required columns).
CHALLENGE_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "train.csv": ("train", ("id_code", "experiment", "plate", "well", "sirna")),
    "test.csv": ("test", ("id_code", "experiment", "plate", "well")),
    "train_controls.csv": ("train", ("id_code", "experiment", "plate", "well", "sirna",
                                     "well_type")),
    "test_controls.csv": ("test", ("id_code", "experiment", "plate", "well", "sirna",
                                   "well_type")),
}
RELEASED_TABLE = "metadata.csv"
RELEASED_COLUMNS: tuple[str, ...] = ("experiment", "plate", "well", "site", "well_type")

#: Features of an rxrx1-utils TFRecord: name -> (kind, required). "bytes" | "int".
TFRECORD_FEATURES: dict[str, tuple[str, bool]] = {
    "image": ("bytes", True),
    "experiment": ("bytes", True),
    "plate": ("int", True),
    "well": ("bytes", True),
    "site": ("int", True),
    "cell_type": ("bytes", False),
    "well_type": ("bytes", False),
    "sirna": ("int", False),      # absent for unlabelled (test) sites
}

_IMAGE_NAME = re.compile(r"^(?P<well>[A-Za-z]+\d+)_s(?P<site>\d+)_w(?P<channel>\d+)\.png$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Rxrx1Error(ValueError):
    """Bad RxRx1 input: the message names the file, its line and the column."""


# --------------------------------------------------------------------------- PNG
def encode_png_gray8(image: np.ndarray, level: int = 1) -> bytes:
    """A 2-D uint8 array as an 8-bit grayscale PNG (no filtering, zlib `level`).

    A few times faster than PIL's encoder for small images, which is what makes
    writing thousands of channel images take seconds.
    """
    image = np.ascontiguousarray(image, np.uint8)
    h, w = image.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    rows = np.concatenate([np.zeros((h, 1), np.uint8), image], axis=1)  # filter byte 0
    return (_PNG_SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + chunk(b"IEND", b""))


def png_header(path: str) -> tuple[int, int]:
    """(height, width) of an 8-bit grayscale PNG from its header.

    Raises:
      Rxrx1Error: not readable, not a PNG, or not 8-bit grayscale (the message says which).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(29)
    except OSError as e:
        raise Rxrx1Error(f"cannot read: {e.strerror or e}") from e
    if len(head) < 29 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise Rxrx1Error("not a PNG file (bad signature or header)")
    width, height, depth, colour = struct.unpack(">IIBB", head[16:26])
    if depth != 8 or colour != 0:
        raise Rxrx1Error(f"a PNG of bit depth {depth}, colour type {colour}; expected 8-bit "
                         "grayscale")
    return height, width


def load_site(paths: Iterable[str]) -> np.ndarray:
    """The six channel PNGs of a site as uint8 (H, W, 6).

    Raises:
      Rxrx1Error: a file that cannot be decoded or channels of different sizes (naming
        the file).
    """
    from PIL import Image

    planes = []
    for path in paths:
        try:
            with Image.open(path) as im:
                plane = np.asarray(im)
        except (OSError, ValueError) as e:
            raise Rxrx1Error(f"{path}: cannot decode the channel image: {e}") from e
        if plane.dtype != np.uint8 or plane.ndim != 2:
            raise Rxrx1Error(f"{path}: expected an 8-bit grayscale image, got "
                             f"{plane.dtype} {plane.shape}")
        if planes and plane.shape != planes[0].shape:
            raise Rxrx1Error(f"{path}: {plane.shape} pixels, but channel 1 of the site has "
                             f"{planes[0].shape}")
        planes.append(plane)
    return np.stack(planes, axis=-1)


# --------------------------------------------------------------------------- TFRecords
def make_tfrecord_example(image: np.ndarray, *, experiment: str, plate: int, well: str,
                          site: int, cell_type: str = "", well_type: str = "treatment",
                          sirna: int | None = None) -> bytes:
    """One rxrx1-utils TFRecord example (as `images2tfrecords.dict_to_tfexample`).

    Args:
      image: uint8 (H, W, 6).
      sirna: the class, or None where unknown (the feature is then left out).
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != N_CHANNELS:
        raise Rxrx1Error(f"image must be uint8 (H, W, 6), got {image.dtype} {image.shape}")
    values = {"image": image.tobytes(), "experiment": experiment, "plate": plate,
              "well": well, "site": site, "cell_type": cell_type or experiment.split("-")[0],
              "well_type": well_type}
    if sirna is not None:
        values["sirna"] = sirna
    feature = {}
    for key, value in values.items():
        if TFRECORD_FEATURES[key][0] == "int":
            feature[key] = feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[int(value)]))
        else:
            data = value if isinstance(value, bytes) else str(value).encode()
            feature[key] = feature_pb2.Feature(bytes_list=feature_pb2.BytesList(value=[data]))
    return example_pb2.Example(features=feature_pb2.Features(feature=feature)).SerializeToString(
        deterministic=True)


def parse_tfrecord_example(serialized: bytes, source: str = "<record>") -> dict:
    """Reads one rxrx1-utils example: metadata and the uint8 (S, S, 6) image.

    Returns:
      dict with experiment, plate, well, site, cell_type, well_type, sirna (None where
      absent) and image.

    Raises:
      Rxrx1Error: a required feature is missing, or the image is not S*S*6 bytes;
        the message names `source`.
    """
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example()
    try:
        example.ParseFromString(serialized)
    except Exception as e:  # protobuf's DecodeError
        raise Rxrx1Error(f"{source}: not a tf.train.Example: {e}") from e
    feats = example.features.feature
    out: dict = {}
    for key, (kind, required) in TFRECORD_FEATURES.items():
        if key not in feats:
            if required:
                raise Rxrx1Error(f"{source}: feature {key!r} is missing; an RxRx1 record "
                                 f"holds {', '.join(TFRECORD_FEATURES)}")
            out[key] = None
            continue
        values = (feats[key].int64_list.value if kind == "int" else feats[key].bytes_list.value)
        if len(values) != 1:
            raise Rxrx1Error(f"{source}: feature {key!r} holds {len(values)} values, expected "
                             f"one {kind} value")
        out[key] = int(values[0]) if kind == "int" else bytes(values[0])
    data = out.pop("image")
    side = int(round((len(data) / N_CHANNELS) ** 0.5))
    if side * side * N_CHANNELS != len(data) or side == 0:
        raise Rxrx1Error(f"{source}: feature 'image' holds {len(data)} bytes, not the raw "
                         "pixels of a square 6-channel uint8 site (S*S*6)")
    out["image"] = np.frombuffer(data, np.uint8).reshape(side, side, N_CHANNELS)
    for key in ("experiment", "well", "cell_type", "well_type"):
        out[key] = out[key].decode() if out[key] is not None else None
    return out


def read_tfrecords(path: str) -> Iterable[tuple[int, dict]]:
    """(record index, parsed example) of an rxrx1-utils TFRecord file (GZIP or not, told
    from the file's first bytes).

    Raises:
      Rxrx1Error: a corrupt file or record (naming the file and the record).
    """
    import tensorflow as tf

    with open(path, "rb") as f:
        gzip = f.read(2) == b"\x1f\x8b"
    dataset = tf.data.TFRecordDataset(path, compression_type="GZIP" if gzip else "")
    index = 0
    iterator = iter(dataset)
    while True:
        try:
            serialized = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as e:
            raise Rxrx1Error(f"{path}: record {index}: corrupt TFRecord data: "
                             f"{e.message.splitlines()[0]}") from e
        yield index, parse_tfrecord_example(serialized.numpy(), f"{path}: record {index}")
        index += 1


# --------------------------------------------------------------------------- tables
def _line(i: int) -> int:
    return i + 2  # header is line 1


def _read_table(path: str, required: Iterable[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as e:
        raise Rxrx1Error(f"{path}: cannot be read as CSV ({e})") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise Rxrx1Error(f"{path}: missing column(s) {', '.join(map(repr, missing))}; "
                         f"columns: {', '.join(df.columns)}")
    for col in required:
        values = df[col].str.strip()
        empty = values == ""
        if empty.any() and col != "sirna":
            raise Rxrx1Error(f"{path}: line {_line(int(np.flatnonzero(empty)[0]))}: column "
                             f"{col!r} is empty")
        df[col] = values
    return df


def _as_text(series: pd.Series) -> pd.Series:
    return series.map(lambda v: "" if v is None or (not isinstance(v, str) and pd.isna(v))
                      else str(v)).str.strip()


def _ints(df: pd.DataFrame, col: str, path: str, nullable: bool = False) -> pd.Series:
    values = _as_text(df[col])
    out = pd.to_numeric(values.where(values != "", None), errors="coerce")
    bad = (out.isna() & (values != "")) | (out.notna() & (out != np.floor(out)))
    if not nullable:
        bad |= values == ""
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise Rxrx1Error(f"{path}: line {_line(i)}: column {col!r} must be an integer, got "
                         f"{values.iloc[i]!r}")
    return out.astype("Int64")


def _check_well_types(df: pd.DataFrame, path: str) -> None:
    bad = ~df["well_type"].isin(WELL_TYPES)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise Rxrx1Error(f"{path}: line {_line(i)}: column 'well_type' is "
                         f"{df['well_type'].iloc[i]!r}; expected one of {', '.join(WELL_TYPES)}")


def detect_layout(root: str) -> str:
    """Which RxRx1 layout `root` holds ("challenge", "released" or "tfrecords").

    Raises:
      Rxrx1Error: none of them (saying what was looked for).
    """
    if not os.path.isdir(root):
        raise Rxrx1Error(f"{root}: not a folder")
    if os.path.exists(os.path.join(root, RELEASED_TABLE)):
        return "released"
    if any(os.path.exists(os.path.join(root, t)) for t in CHALLENGE_TABLES):
        return "challenge"
    if _tfrecord_files(root):
        return "tfrecords"
    raise Rxrx1Error(f"{root}: no RxRx1 layout found: expected {RELEASED_TABLE} (released), "
                     f"{' / '.join(CHALLENGE_TABLES)} (challenge) or *.tfrecord files")


def _tfrecord_files(root: str) -> list[str]:
    found = set()
    for pattern in ("*.tfrecord", "*.tfrecord.gz", "*.tfrecords"):
        found.update(glob.glob(os.path.join(root, "**", pattern), recursive=True))
    return sorted(found)


def read_challenge_tables(root: str, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """The wells of the challenge layout: one row per well with dataset, experiment,
    plate, well, sirna (Int; NA where unlabelled), sirna_name, well_type, folder.

    Raises:
      Rxrx1Error: a missing column, an empty or non-integer value, an unknown well type
        or a well listed twice (naming the file and line).
    """
    frames = []
    for name, (dataset, required) in CHALLENGE_TABLES.items():
        path = os.path.join(root, name)
        if not os.path.exists(path):
            continue
        df = _read_table(path, required)
        if "well_type" not in df.columns:
            df["well_type"] = "treatment"
        _check_well_types(df, path)
        out = pd.DataFrame({"id_code": df["id_code"], "experiment": df["experiment"],
                            "plate": _ints(df, "plate", path), "well": df["well"],
                            "well_type": df["well_type"], "dataset": dataset})
        out["sirna"] = (_ints(df, "sirna", path, nullable=dataset == "test")
                        if "sirna" in df.columns else pd.array([pd.NA] * len(df), "Int64"))
        if dataset == "train" and out["sirna"].isna().any():
            i = int(np.flatnonzero(out["sirna"].isna().to_numpy())[0])
            raise Rxrx1Error(f"{path}: line {_line(i)}: column 'sirna' is empty")
        out["sirna_name"] = ""
        out["_source"] = [f"{path}: line {_line(i)}" for i in range(len(df))]
        frames.append(out)
    if not frames:
        raise Rxrx1Error(f"{root}: none of {', '.join(CHALLENGE_TABLES)} found")
    wells = pd.concat(frames, ignore_index=True)
    dup = wells["id_code"].duplicated(keep=False)
    if dup.any():
        first = wells[dup].iloc[:2]["_source"].tolist()
        raise Rxrx1Error(f"well {wells[dup]['id_code'].iloc[0]!r} is listed twice: "
                         f"{' and '.join(first)}")
    wells["folder"] = [os.path.join(root, d, e, f"Plate{p}") for d, e, p in
                       zip(wells["dataset"], wells["experiment"], wells["plate"], strict=True)]
    wells["site"] = pd.array([pd.NA] * len(wells), "Int64")
    return _apply_labels(wells, labels)


def read_released_table(root: str, labels: pd.DataFrame | None = None) -> pd.DataFrame:
    """The sites of the released layout (metadata.csv), in the columns of
    `read_challenge_tables` plus site."""
    path = os.path.join(root, RELEASED_TABLE)
    df = _read_table(path, RELEASED_COLUMNS)
    _check_well_types(df, path)
    label_col = "sirna_id" if "sirna_id" in df.columns else ("sirna" if "sirna" in df.columns
                                                              else None)
    out = pd.DataFrame({"experiment": df["experiment"], "plate": _ints(df, "plate", path),
                        "well": df["well"], "site": _ints(df, "site", path),
                        "well_type": df["well_type"]})
    out["id_code"] = [f"{e}_{p}_{w}" for e, p, w in zip(out["experiment"], out["plate"],
                                                        out["well"], strict=True)]
    if "dataset" in df.columns:
        bad = ~df["dataset"].isin(DATASETS)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise Rxrx1Error(f"{path}: line {_line(i)}: column 'dataset' is "
                             f"{df['dataset'].iloc[i]!r}; expected train or test")
        out["dataset"] = df["dataset"]
    out["sirna"] = (_ints(df, label_col, path, nullable=True) if label_col
                    else pd.array([pd.NA] * len(df), "Int64"))
    if "dataset" not in df.columns:
        out["dataset"] = np.where(out["sirna"].isna(), "test", "train")
    out["sirna_name"] = df["sirna"] if label_col == "sirna_id" else ""
    out["_source"] = [f"{path}: line {_line(i)}" for i in range(len(df))]
    key = out["id_code"] + "_" + out["site"].astype(str)
    dup = key.duplicated(keep=False)
    if dup.any():
        first = out[dup].iloc[:2]["_source"].tolist()
        raise Rxrx1Error(f"site {key[dup].iloc[0]!r} is listed twice: {' and '.join(first)}")
    out["folder"] = [os.path.join(root, "images", e, f"Plate{p}") for e, p in
                     zip(out["experiment"], out["plate"], strict=True)]
    return _apply_labels(out, labels)


def read_labels(path: str) -> pd.DataFrame:
    """A labels table (id_code, sirna), e.g. a synthetic set's truth.csv."""
    df = _read_table(path, ("id_code", "sirna"))
    return pd.DataFrame({"id_code": df["id_code"], "sirna": _ints(df, "sirna", path)})


def _apply_labels(wells: pd.DataFrame, labels: pd.DataFrame | None) -> pd.DataFrame:
    """Fills unlabelled wells' sirna from `labels`; a label that contradicts a table's is
    an error."""
    if labels is None:
        return wells
    known = dict(zip(labels["id_code"], labels["sirna"], strict=True))
    given = wells["id_code"].map(known)
    clash = wells["sirna"].notna() & given.notna() & (wells["sirna"] != given)
    if clash.any():
        i = int(np.flatnonzero(clash.to_numpy())[0])
        raise Rxrx1Error(f"{wells['_source'].iloc[i]}: sirna {wells['sirna'].iloc[i]} but the "
                         f"labels table says {given.iloc[i]} for {wells['id_code'].iloc[i]}")
    wells["sirna"] = wells["sirna"].fillna(given.astype("Int64"))
    return wells


# --------------------------------------------------------------------------- ingest
@dataclasses.dataclass(frozen=True)
class Rxrx1IngestConfig:
    """`bin/ingest --layout=rxrx1`.

    Attributes:
      images: the RxRx1 root (any of `LAYOUTS`).
      out: output folder (manifest.csv, skipped.csv; images/ for TFRecords).
      labels: optional CSV (id_code, sirna) filling unlabelled wells (a synthetic
        set's truth.csv), so that held-out experiments can be scored.
      workers: threads reading PNG headers.
    """

    images: str
    out: str
    labels: str = ""
    workers: int = 4


@dataclasses.dataclass
class Rxrx1IngestResult:
    layout: str
    manifest: pd.DataFrame
    skipped: pd.DataFrame
    manifest_path: str
    skipped_path: str | None


def _skip(source, kind, reason, row=None, site=None) -> dict:
    row = row if row is not None else {}
    return {"source": source, "kind": kind, "reason": reason,
            "experiment": row.get("experiment", ""), "plate": row.get("plate", ""),
            "well": row.get("well", ""), "site": "" if site is None else site}


def _list_folder(folder: str) -> tuple[dict, list[str]]:
    """(well, site) -> {channel: file}, and files of the folder that are not channel images."""
    found: dict[tuple[str, int], dict[int, str]] = {}
    other = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return found, other
    for name in names:
        m = _IMAGE_NAME.match(name)
        if not m:
            if name.lower().endswith(".png"):
                other.append(name)
            continue
        found.setdefault((m["well"], int(m["site"])), {})[int(m["channel"])] = \
            os.path.join(folder, name)
    return found, other


def _check_site(files: Mapping[int, str]) -> tuple[tuple[int, int] | None, str]:
    """(height, width) of a site whose six channels are readable and alike, else (None, why)."""
    missing = [c for c in range(1, N_CHANNELS + 1) if c not in files]
    if missing:
        return None, "missing channel(s) " + ", ".join(f"w{c}" for c in missing)
    sizes = []
    for c in range(1, N_CHANNELS + 1):
        try:
            sizes.append(png_header(files[c]))
        except Rxrx1Error as e:
            return None, f"unreadable channel w{c} ({files[c]}): {e}"
    if len(set(sizes)) > 1:
        return None, "channels differ in size: " + ", ".join(
            f"w{c} {h}x{w}" for c, (h, w) in enumerate(sizes, 1))
    return sizes[0], ""


def _resolve_sites(table: pd.DataFrame, workers: int) -> tuple[list[dict], list[dict]]:
    """Manifest rows (without image_id) and skipped rows from a well/site table."""
    listings = {}
    for folder in table["folder"].unique():
        listings[folder] = _list_folder(folder)
    skipped: list[dict] = []
    todo: list[tuple[dict, int, dict]] = []
    claimed: set[tuple[str, str, int]] = set()
    for row in table.to_dict("records"):
        found, _ = listings[row["folder"]]
        if pd.isna(row["site"]):
            sites = sorted(s for (w, s) in found if w == row["well"])
            if not sites:
                skipped.append(_skip(row["_source"], "missing", f"no images of well "
                                     f"{row['well']} in {row['folder']}", row))
                continue
        else:
            sites = [int(row["site"])]
        for site in sites:
            claimed.add((row["folder"], row["well"], site))
            todo.append((row, site, found.get((row["well"], site), {})))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        checks = list(pool.map(lambda t: _check_site(t[2]), todo))
    rows = []
    for (row, site, files), (size, why) in zip(todo, checks, strict=True):
        if size is None:
            skipped.append(_skip(row["_source"], "missing" if why.startswith("missing")
                                 else "unreadable", why, row, site))
            continue
        rows.append({
            "site_id": f"{row['id_code']}_{site}", "id_code": row["id_code"],
            "dataset": row["dataset"], "experiment": row["experiment"],
            "plate": int(row["plate"]), "well": row["well"], "site": site,
            "cell_type": str(row["experiment"]).split("-")[0], "well_type": row["well_type"],
            "sirna": row["sirna"], "sirna_name": row["sirna_name"], "height": size[0],
            "width": size[1], **{CHANNEL_COLUMNS[c - 1]: files[c]
                                 for c in range(1, N_CHANNELS + 1)}})
    for folder, (found, other) in listings.items():
        for well, site in sorted(found):
            if (folder, well, site) not in claimed:
                skipped.append(_skip(os.path.join(folder, f"{well}_s{site}_w*.png"),
                                     "no_metadata", "images without a metadata row", None,
                                     site) | {"well": well})
        for name in other:
            skipped.append(_skip(os.path.join(folder, name), "unrecognised",
                                 "not named {well}_s{site}_w{channel}.png"))
    return rows, skipped


def _unpack_tfrecords(root: str, out: str) -> tuple[list[dict], list[dict]]:
    """Writes each site of the TFRecords below `root` as six PNGs under out/images."""
    rows, skipped, seen = [], [], {}
    for path in _tfrecord_files(root):
        parts = set(os.path.relpath(path, root).split(os.sep))
        for index, site in read_tfrecords(path):
            source = f"{path}: record {index}"
            key = (site["experiment"], site["plate"], site["well"], site["site"])
            if key in seen:
                skipped.append(_skip(source, "duplicate", f"site also in {seen[key]} (kept "
                                     "there)", site, site["site"]))
                continue
            seen[key] = source
            well_type = site["well_type"] or "treatment"
            if well_type not in WELL_TYPES:
                raise Rxrx1Error(f"{source}: feature 'well_type' is {well_type!r}; expected "
                                 f"one of {', '.join(WELL_TYPES)}")
            dataset = next((d for d in DATASETS if d in parts),
                           "train" if site["sirna"] is not None else "test")
            folder = os.path.join(out, "images", site["experiment"], f"Plate{site['plate']}")
            os.makedirs(folder, exist_ok=True)
            files = {}
            for c in range(1, N_CHANNELS + 1):
                files[c] = os.path.join(folder, f"{site['well']}_s{site['site']}_w{c}.png")
                tmp = files[c] + ".tmp"
                with open(tmp, "wb") as f:
                    f.write(encode_png_gray8(site["image"][:, :, c - 1]))
                os.replace(tmp, files[c])
            id_code = f"{site['experiment']}_{site['plate']}_{site['well']}"
            rows.append({
                "site_id": f"{id_code}_{site['site']}", "id_code": id_code, "dataset": dataset,
                "experiment": site["experiment"], "plate": site["plate"], "well": site["well"],
                "site": site["site"], "cell_type": site["cell_type"]
                or site["experiment"].split("-")[0], "well_type": well_type,
                "sirna": site["sirna"], "sirna_name": "", "height": site["image"].shape[0],
                "width": site["image"].shape[1],
                **{CHANNEL_COLUMNS[c - 1]: files[c] for c in range(1, N_CHANNELS + 1)}})
    return rows, skipped


def _relative(path: str, base: str) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return path if rel.startswith("..") else rel


def ingest_rxrx1(cfg: Rxrx1IngestConfig) -> Rxrx1IngestResult:
    """Reads an RxRx1 folder (any layout) into OUT/manifest.csv and OUT/skipped.csv.

    Raises:
      Rxrx1Error: no layout found, a bad table (naming file, line and column), or no
        usable site at all.
    """
    if not cfg.out:
        raise Rxrx1Error("an output folder (--out) is required")
    layout = detect_layout(cfg.images)
    labels = read_labels(cfg.labels) if cfg.labels else None
    os.makedirs(cfg.out, exist_ok=True)
    if layout == "tfrecords":
        rows, skipped = _unpack_tfrecords(cfg.images, cfg.out)
        if labels is not None:
            known = dict(zip(labels["id_code"], labels["sirna"], strict=True))
            for row in rows:
                if row["sirna"] is None and row["id_code"] in known:
                    row["sirna"] = int(known[row["id_code"]])
    else:
        table = (read_released_table(cfg.images, labels) if layout == "released"
                 else read_challenge_tables(cfg.images, labels))
        rows, skipped = _resolve_sites(table, cfg.workers)
    skipped_df = pd.DataFrame(skipped, columns=["source", "kind", "reason", "experiment",
                                                "plate", "well", "site"])
    skipped_path = os.path.join(cfg.out, SKIPPED_NAME)
    if os.path.exists(skipped_path):
        os.remove(skipped_path)
    if len(skipped_df):
        atomic_write_text(skipped_path, skipped_df.to_csv(index=False))
    if not rows:
        raise Rxrx1Error(f"{cfg.images}: no usable site ({len(skipped_df)} skipped: see "
                         f"{skipped_path})")
    df = pd.DataFrame(rows)
    df = df.sort_values(["dataset", "experiment", "plate", "well", "site"], kind="stable")
    df.insert(0, "image_id", np.arange(len(df)))
    manifest_path = os.path.join(cfg.out, MANIFEST_NAME)
    for col in CHANNEL_COLUMNS:
        df[col] = [_relative(p, cfg.out) for p in df[col]]
    df = write_manifest(df, manifest_path)
    return Rxrx1IngestResult(layout, df, skipped_df, manifest_path,
                             skipped_path if len(skipped_df) else None)


# --------------------------------------------------------------------------- manifest
def validate_manifest(df: pd.DataFrame, source: str = "<manifest>") -> pd.DataFrame:
    """Checks and types an RxRx1 manifest; returns it with `MANIFEST_COLUMNS` first.

    Raises:
      Rxrx1Error: a missing column, an empty or mistyped value, an unknown well type or
        dataset, or a repeated image_id / site_id (naming the file, line and column).
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise Rxrx1Error(f"{source}: missing column(s) {', '.join(map(repr, missing))} of an "
                         "RxRx1 manifest")
    out = df.copy().reset_index(drop=True)
    for col, (kind, _) in MANIFEST_COLUMNS.items():
        if kind in ("int", "Int"):
            out[col] = _ints(out, col, source, nullable=kind == "Int")
            if kind == "int":
                out[col] = out[col].astype("int64")
        else:
            text = _as_text(out[col])
            if col not in ("sirna_name",):
                empty = text == ""
                if empty.any():
                    raise Rxrx1Error(f"{source}: line {_line(int(np.flatnonzero(empty)[0]))}: "
                                     f"column {col!r} is empty")
            out[col] = text
    for col, allowed in (("well_type", WELL_TYPES), ("dataset", DATASETS)):
        bad = ~out[col].isin(allowed)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise Rxrx1Error(f"{source}: line {_line(i)}: column {col!r} is {out[col].iloc[i]!r}; "
                             f"expected one of {', '.join(allowed)}")
    for col in ("image_id", "site_id"):
        dup = out[col].duplicated()
        if dup.any():
            raise Rxrx1Error(f"{source}: line {_line(int(np.flatnonzero(dup)[0]))}: column "
                             f"{col!r} repeats {out[col][dup].iloc[0]!r}")
    extra = [c for c in out.columns if c not in MANIFEST_COLUMNS]
    return out[list(MANIFEST_COLUMNS) + extra]


def write_manifest(df: pd.DataFrame, path: str) -> pd.DataFrame:
    """Validates and writes an RxRx1 manifest atomically; returns what was written."""
    out = validate_manifest(df, path)
    atomic_write_text(path, out.to_csv(index=False))
    return out


def read_manifest(path: str) -> pd.DataFrame:
    """Reads and validates an RxRx1 manifest (`MANIFEST_COLUMNS`).

    Raises:
      Rxrx1Error: missing, unreadable, or breaking the schema (naming line and column).
    """
    if not os.path.exists(path):
        raise Rxrx1Error(f"{path}: manifest not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise Rxrx1Error(f"{path}: cannot be read as CSV ({e})") from e
    return validate_manifest(df, path)


def is_rxrx1_manifest(path: str) -> bool:
    """Whether a CSV's header is that of an RxRx1 manifest (it has the channel columns)."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError):
        return False
    names = {c.strip() for c in header.strip().split(",")}
    return set(CHANNEL_COLUMNS) <= names


def channel_paths(df: pd.DataFrame, manifest_path: str) -> np.ndarray:
    """Absolute channel paths, (n, 6) strings, from a manifest's path columns."""
    base = os.path.dirname(os.path.abspath(manifest_path))
    return np.array([[p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
                      for p in row] for row in df[list(CHANNEL_COLUMNS)].to_numpy()],
                    dtype=object).reshape(len(df), N_CHANNELS)

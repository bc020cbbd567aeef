"""`bin/embed`: embed the records of TFRecord shards with an exported SavedModel.

The served model, not the Python one, is what gets evaluated: the serialized records,
exactly as they are in the shards, go in batches through the SavedModel's
`tf_example` signature (`ish_tf.export`), which parses and decodes them in-graph with
the record schema, so any family's records embed: JPEG/PNG patches, raw multi-channel
images, vectors. SavedModels exported before `tf_example` existed are fed each
record's ENCODED image bytes (`image/encoded`) through `serving_default` instead.
Vector records have no image position: their patch_index, x and y are 0.

Outputs in OUT (`table_format`: csv; parquet, needs pyarrow; h5ad, needs anndata: one
AnnData per level, metadata in `obs`, the embedding in `obsm["X_<family>"]`)::

    OUT/patch_embeddings.csv       image_id, patch_index, x, y, gene_symbol, entrez_id,
                                   donor_id, region, study, split, every other manifest
                                   column (the lab's own included), dim_000..dim_<D-1>
    OUT/image_embeddings.csv       mean over each image's patches (+ n_patches)
    OUT/gene_donor_embeddings.csv  mean per (gene_symbol, donor_id) (+ n_patches,
                                   n_images); written as donor_embeddings.csv before
    OUT/gene_embeddings.csv        mean per gene_symbol (+ n_patches, n_images)
    OUT/skipped.csv                records that could not be parsed or decoded, and why
    OUT/embed_summary.json         model, signature, counts, throughput, manifest

The manifest is the one index.json names (`bin/extract` records it), or `manifest`;
its columns join the records by image_id, and each coarser table keeps the columns that
are constant within its rows (a donor's age at the (gene, donor) level, a gene's own
columns at the gene level). Unknown values are empty, never -1.

Gene (and donor) vectors are the mean over ALL their patches, as in Abed-Esfahani
et al. 2022 (`gene_from="patches"`), so images with more patches weigh more;
`gene_from="images"` averages the image means instead (every image weighs the same).

Resumable: each finished shard's embeddings are kept in `OUT/.parts/<shard>.npz`,
tagged with the SavedModel's fingerprint and the shard's size and mtime; a rerun
reuses the parts that still match and embeds the rest. The parts are deleted once
the tables are written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ish_tf import fs
from ish_tf.data import records
from ish_tf.data.embeddings import (
    LEVEL_ALIASES,
    LEVEL_FILES,
    LEVEL_KEYS,
    LEVELS,
    TABLE_FORMATS,
    EmbeddingTable,
    EmbeddingTableError,
    aggregate,
    require_format,
    write_embedding_table,
)
from ish_tf.data.records import RecordsError
from ish_tf.data.shards import compression_of, index_path, load_index
from ish_tf.io_utils import Progress, atomic_path, atomic_write_bytes, atomic_write_text

#: Key columns of the patch table, in order.
PATCH_KEYS: tuple[str, ...] = ("image_id", "patch_index", "x", "y", "gene_symbol", "entrez_id",
                               "donor_id", "region", "study", "split")
_RECORD_KEYS = tuple(k for k in PATCH_KEYS if k != "split")
_STRING_KEYS = ("gene_symbol", "donor_id", "region", "study")
GENE_FROM = ("patches", "images")
PARTS_DIR = ".parts"
SKIPPED_NAME = "skipped.csv"
SUMMARY_NAME = "embed_summary.json"
# n_records: how many records a row stands for (1 for a record that could not be parsed
# or decoded; a corrupt stretch of a shard read with skip_corrupt: the records it lost).
#: Start of the error of a skipped.csv row standing for records that could not be read.
LOST_PREFIX = "lost: "
_SKIPPED_COLUMNS = ["split", "shard", "record", "image_id", "patch_index", "error", "n_records"]


class EmbedError(ValueError):
    """Bad embedding input or settings; the message names the file, flag or signature."""


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """Settings of `embed_records`.

    Attributes:
      saved_model: a SavedModel version directory, or an export base (newest version).
      records_dir: records directory written by `bin/extract` (index.json + shards).
      out_dir: output directory OUT.
      splits: splits to embed; empty = every split with shards.
      batch_size: patches per call of the serving signature.
      gene_from: "patches" (mean of all patches, the paper) or "images" (mean of image
        means); applies to the donor and gene levels.
      table_format: "csv", "parquet" (needs pyarrow) or "h5ad" (needs anndata).
      signature: serving signature; "" (auto): `tf_example` fed with the serialized
        records when the export has it, else `serving_default` fed with the encoded
        image bytes (exports from before tf_example). A signature whose string input
        is `examples` (tf_example) gets records, any other gets image bytes.
      output: output of the signature to store; None = the export's first output
        (or the only one).
      levels: tables to write, a subset of ("patch", "image", "donor", "gene");
        "gene_donor" is another name of "donor" (one row per gene and donor).
      skip_corrupt: a shard with an unreadable record, or fewer records than
        index.json lists, is embedded as far as it can be read and the records lost
        are counted (skipped.csv, the summary); False: such a shard is an error.
      allow_foreign_saved_model: load a SavedModel that has no ish_tf export metadata
        (assets.extra/ish_tf.json). A SavedModel is code: it runs whatever its graph
        says, so only load one from a trusted source.
      manifest: the manifest whose columns join the records by image_id; "" = the one
        index.json names (when it exists); "none" = record keys only.
    """

    saved_model: str
    records_dir: str
    out_dir: str
    splits: tuple[str, ...] = ()
    batch_size: int = 64
    gene_from: str = "patches"
    table_format: str = "csv"
    signature: str = ""
    output: str | None = None
    levels: tuple[str, ...] = LEVELS
    skip_corrupt: bool = False
    allow_foreign_saved_model: bool = False
    manifest: str = ""

    def validate(self) -> EmbedConfig:
        """Checks the settings.

        Returns:
          self.

        Raises:
          EmbedError: naming the offending setting.
        """
        if not self.saved_model:
            raise EmbedError("--saved_model is required: an export base EXPORT/<name> or a "
                             "version directory written by bin/export")
        if not self.records_dir:
            raise EmbedError("--records_dir is required: the directory written by bin/extract")
        if not self.out_dir:
            raise EmbedError("--out is required: the directory to write the embeddings to")
        if self.batch_size < 1:
            raise EmbedError(f"batch size must be >= 1, got {self.batch_size}")
        if self.gene_from not in GENE_FROM:
            raise EmbedError(f"--gene_from must be one of {GENE_FROM}, got {self.gene_from!r}")
        if self.table_format not in TABLE_FORMATS:
            raise EmbedError(f"--table_format must be one of {TABLE_FORMATS}, "
                             f"got {self.table_format!r}")
        try:
            require_format(self.table_format)
        except EmbeddingTableError as e:
            raise EmbedError(f"--table_format={self.table_format}: {e}") from None
        if self.manifest not in ("", "none") and not fs.exists(self.manifest):
            raise EmbedError(f"--manifest {self.manifest}: not found")
        bad = [lv for lv in self.levels if LEVEL_ALIASES.get(lv, lv) not in LEVELS]
        if bad or not self.levels:
            raise EmbedError(f"--levels must be a non-empty subset of {LEVELS} (gene_donor = "
                             f"donor), got {list(self.levels)}")
        return dataclasses.replace(
            self, levels=tuple(LEVEL_ALIASES.get(lv, lv) for lv in self.levels))


@dataclasses.dataclass
class EmbedResult:
    """What `embed_records` wrote.

    Attributes:
      out_dir: OUT.
      saved_model: the version directory used.
      tables: level -> path of its table.
      rows: level -> number of rows.
      dim: embedding width D.
      skipped: records skipped (listed in `skipped_path`).
      skipped_path: OUT/skipped.csv.
      shards_reused: shards taken from a previous interrupted run.
      patches_embedded: patches embedded in this run (not reused).
      seconds: wall time of the embedding loop.
      patches_per_sec: patches_embedded / seconds.
      records_lost: records of corrupt shards that could not be read (skip_corrupt).
      lost_by_shard: shard file -> records lost in it (only shards that lost some).
      manifest: the manifest joined to the tables ("" = none).
      manifest_columns: the columns it added.
      manifest_note: why no manifest was joined, or how many images it lacked ("" = ok).
    """

    out_dir: str
    saved_model: str
    tables: dict[str, str]
    rows: dict[str, int]
    dim: int
    skipped: int
    skipped_path: str
    shards_reused: int
    patches_embedded: int
    seconds: float
    patches_per_sec: float
    records_lost: int = 0
    lost_by_shard: dict[str, int] = dataclasses.field(default_factory=dict)
    manifest: str = ""
    manifest_columns: list[str] = dataclasses.field(default_factory=list)
    manifest_note: str = ""


# --------------------------------------------------------------------------- served model
def _takes_one_string(fn) -> bool:
    import tensorflow as tf

    inputs = fn.structured_input_signature[1]
    return len(inputs) == 1 and next(iter(inputs.values())).dtype == tf.string


class ServedModel:
    """One signature of a SavedModel, fed serialized records or encoded image bytes.

    Args:
      path: SavedModel version directory or export base (newest version).
      signature: signature name; "" or "auto": `tf_example` when the export has it,
        else `serving_default`. `serving_default` of an export whose serving_default
        takes no encoded bytes (raw-pixel and vector exports) means `tf_example`.
      output: output key; None = the export's first declared output, or the only one.
      allow_foreign: load a SavedModel without ish_tf's export metadata (the sidecar
        `assets.extra/ish_tf.json`); refused by default, because a SavedModel is code
        that runs when called (it may read or write files).

    Attributes:
      feeds: "records" (the signature parses serialized records: `tf_example`) or
        "image_bytes" (it decodes JPEG/PNG bytes: `serving_default` of image exports).

    Raises:
      EmbedError: no ish_tf metadata (unless allow_foreign), no such signature, no
        single string input, or an ambiguous output.
    """

    def __init__(self, path: str, signature: str = "", output: str | None = None,
                 allow_foreign: bool = False):
        import tensorflow as tf

        from ish_tf.export import saved_model as sm
        from ish_tf.export import signatures as sig

        try:
            self.path, self.metadata = sm.open_trusted(path, allow_foreign)
        except sm.ExportError as e:
            raise EmbedError(str(e)) from None
        self._loaded = tf.saved_model.load(self.path)
        have = self._loaded.signatures
        if signature in ("", "auto"):
            signature = sig.TF_EXAMPLE if sig.TF_EXAMPLE in have else sm.SERVING_DEFAULT
        elif (signature == sm.SERVING_DEFAULT and sig.TF_EXAMPLE in have
              and not _takes_one_string(have[signature])):
            # Raw-pixel and vector exports: serving_default takes tensors that records
            # cannot be fed as; tf_example takes the same records and gives its outputs.
            signature = sig.TF_EXAMPLE
        if signature not in self._loaded.signatures:
            raise EmbedError(f"{self.path}: no signature {signature!r}; it has "
                             f"{sorted(self._loaded.signatures)}")
        self.signature = signature
        self._fn = self._loaded.signatures[signature]
        inputs = self._fn.structured_input_signature[1]
        strings = [k for k, spec in inputs.items() if spec.dtype == tf.string]
        if len(inputs) != 1 or len(strings) != 1:
            hint = ("; it has no tf_example signature (exported before input kinds?): "
                    "re-export it with bin/export" if sig.TF_EXAMPLE not in
                    self._loaded.signatures else "")
            raise EmbedError(f"{self.path}: signature {signature!r} must take one tf.string "
                             f"input of serialized records or encoded images, it takes "
                             f"{dict(inputs)}{hint}")
        self.input_key = strings[0]
        self.feeds = ("records" if signature == sig.TF_EXAMPLE
                      or self.input_key == sig.EXAMPLES_INPUT else "image_bytes")
        outputs = list(self._fn.structured_outputs)
        if output is None:
            declared = [o for o in self.metadata.get("outputs", []) if o in outputs]
            if declared:
                output = declared[0]
            elif len(outputs) == 1:
                output = outputs[0]
            else:
                raise EmbedError(f"{self.path}: signature {signature!r} has outputs {outputs}; "
                                 "choose one with --output_key")
        if output not in outputs:
            raise EmbedError(f"{self.path}: signature {signature!r} has no output {output!r}; "
                             f"it has {outputs}")
        self.output = output
        try:
            self.fingerprint = tf.saved_model.experimental.read_fingerprint(self.path).singleprint()
        except Exception:  # older SavedModels have no fingerprint.pb
            pb = os.path.join(self.path, "saved_model.pb")
            self.fingerprint = f"{os.path.getsize(pb)}-{os.stat(pb).st_mtime_ns}"

    @property
    def model_id(self) -> str:
        """Identity of (SavedModel, signature, output), to tag resumable parts."""
        return f"{self.fingerprint}|{self.signature}|{self.output}"

    def __call__(self, inputs) -> np.ndarray:
        """Embeds serialized records or encoded images (as `feeds` says).

        Args:
          inputs: tf.string (B,) tensor or a list of bytes.

        Returns:
          float32 (B, D); outputs of rank > 2 are flattened per row.

        Raises:
          tensorflow.errors.InvalidArgumentError: a record or image cannot be decoded.
        """
        import tensorflow as tf

        out = self._fn(**{self.input_key: tf.convert_to_tensor(inputs, tf.string)})
        values = out[self.output].numpy().astype(np.float32, copy=False)
        return values.reshape(values.shape[0], -1)


# --------------------------------------------------------------------------- one shard
def _as_text(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v)
            for v in values]


def _parse(serialized, with_image: bool = True) -> dict[str, np.ndarray]:
    """The key features of a batch of records (+ image/encoded for byte-fed models).

    The keys are those of every input kind; a vector record has no patch_index, x, y
    and reads them as their default 0.
    """
    import tensorflow as tf

    keys = (("image/encoded",) if with_image else ()) + _RECORD_KEYS
    parsed = tf.io.parse_example(serialized, records.feature_spec(keys))
    return {k: v.numpy() for k, v in parsed.items()}


class ShardReadError(EmbedError):
    """A shard with a corrupt record or fewer/more records than index.json says."""


def _records_of(shard_path: str, losses: list[dict], skip_corrupt: bool):
    """Yields (position, serialized record) of a shard, one record at a time.

    A record TensorFlow cannot read (bad CRC, truncated data) stops the stream with
    `ShardReadError`, or, with `skip_corrupt`, is appended to `losses` ({"record":
    position, "n_records": 1 or None for "the rest of the shard", "error": ...}) and
    the records after it are read on where the shard's record offsets allow it
    (uncompressed shards: from the `.offsets.npy` sidecar, else the length headers).
    """
    import shutil
    import tempfile

    import tensorflow as tf

    from ish_tf.data.framing import record_offsets

    compression = compression_of(shard_path) or ""
    source, position = shard_path, 0
    scratch = None
    try:
        while True:
            try:
                for record in tf.data.TFRecordDataset(source, compression_type=compression,
                                                      buffer_size=1 << 20).prefetch(256):
                    yield position, record.numpy()
                    position += 1
                return
            except tf.errors.OpError as e:
                error = f"{type(e).__name__}: {(e.message or '').strip().splitlines()[0]}"
                if not skip_corrupt:
                    raise ShardReadError(error, position) from e
            offsets = None
            if not compression:
                try:
                    offsets = record_offsets(shard_path)
                except (RecordsError, OSError, ValueError):
                    offsets = None  # a truncated shard: no way past the break
            resume = position + 1
            if offsets is None or resume >= len(offsets) - 1:
                losses.append({"record": position, "n_records": None, "error": error})
                return
            losses.append({"record": position, "n_records": 1, "error": error})
            # Read on from the record after the bad one: copy the shard's tail aside.
            if scratch is None:
                scratch = tempfile.mkdtemp(prefix="ish_tf_embed_")
            tail = os.path.join(scratch, f"tail-{resume}.tfrecord")
            with fs.open(shard_path, "rb") as src, open(tail, "wb") as dst:
                src.seek(int(offsets[resume]))
                shutil.copyfileobj(src, dst)
            source, position = tail, resume
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def embed_shard(served: ServedModel, shard_path: str, split: str, batch_size: int = 64,
                bar: Progress | None = None, *, expected: int | None = None,
                skip_corrupt: bool = False) -> tuple[pd.DataFrame, np.ndarray, list[dict]]:
    """Embeds every record of one shard and checks the count against the index.

    The serialized records go to the served model as they are (`served.feeds` ==
    "records"), or their image/encoded bytes do (exports without tf_example).
    A batch that fails to parse or decode is retried record by record; the records
    that still fail are returned as skipped (a readable record with bad content).

    A record that cannot be read at all (a CRC error, a truncated shard), or a shard
    holding another number of records than `expected` (index.json), is an error:
    nothing of the shard is returned. With `skip_corrupt` the readable records are
    embedded and the unreadable ones are counted exactly: one skipped row per corrupt
    stretch, whose `n_records` says how many records it lost, so that the records
    embedded, skipped and lost add up to `expected`.

    Args:
      served: the served model.
      shard_path: a `.tfrecord[.gz]` shard.
      split: its split (stored in the `split` column).
      batch_size: records per call.
      bar: progress bar to advance per record.
      expected: the shard's record count in index.json (None: not checked).
      skip_corrupt: embed what can be read of a corrupt shard and count the loss.

    Returns:
      keys (DataFrame with `PATCH_KEYS`, one row per embedded patch), values float32
      (N, D), and skipped records as dicts with `_SKIPPED_COLUMNS`.

    Raises:
      ShardReadError: (without skip_corrupt) a corrupt or short shard; the message
        names the shard and the counts (index says N, read M).
    """
    import tensorflow as tf

    shard = fs.basename(shard_path)
    columns: dict[str, list] = {k: [] for k in _RECORD_KEYS}
    chunks: list[np.ndarray] = []
    skipped: list[dict] = []
    losses: list[dict] = []
    by_record = getattr(served, "feeds", "image_bytes") == "records"

    def keep(parsed: dict[str, np.ndarray], values: np.ndarray) -> None:
        for k in _RECORD_KEYS:
            v = parsed[k]
            columns[k].extend(_as_text(v) if k in _STRING_KEYS else v.tolist())
        chunks.append(values)

    def skip(record: int, error: str, parsed: dict | None = None, i: int = 0,
             n_records: int = 1) -> None:
        skipped.append({"split": split, "shard": shard, "record": record,
                        "image_id": int(parsed["image_id"][i]) if parsed else -1,
                        "patch_index": int(parsed["patch_index"][i]) if parsed else -1,
                        "error": error.strip().splitlines()[0][:300] if error.strip() else "?",
                        "n_records": int(n_records)})

    def run(positions: list[int], batch: list[bytes]) -> None:
        n = len(batch)
        batch = tf.constant(batch, tf.string)
        try:
            parsed = _parse(batch, with_image=not by_record)
            keep(parsed, served(batch if by_record else parsed["image/encoded"]))
        except tf.errors.InvalidArgumentError:
            # One bad record fails the whole batch: find it by going one at a time.
            for i in range(n):
                try:
                    one = _parse(batch[i:i + 1], with_image=not by_record)
                except tf.errors.InvalidArgumentError as e:
                    skip(positions[i], f"cannot parse the record: {e.message}")
                    continue
                try:
                    keep(one, served(batch[i:i + 1] if by_record else one["image/encoded"]))
                except tf.errors.InvalidArgumentError as e:
                    what = "the record" if by_record else "image/encoded"
                    skip(positions[i], f"cannot decode {what}: {e.message}", one)
        if bar is not None:
            bar.update(n)

    def counts(read: int) -> str:
        said = "?" if expected is None else str(expected)
        return f"index.json says {said} record(s), read {read}"

    read = 0
    positions: list[int] = []
    pending: list[bytes] = []
    try:
        for position, record in _records_of(shard_path, losses, skip_corrupt):
            positions.append(position)
            pending.append(record)
            read += 1
            if len(pending) == batch_size:
                run(positions, pending)
                positions, pending = [], []
    except ShardReadError as e:
        raise ShardReadError(
            f"{shard_path}: unreadable record at record {e.args[1]} ({e.args[0]}); "
            f"{counts(read)} before it. Nothing of this shard was embedded; re-extract it "
            "(bin/extract), or pass --skip_corrupt to embed its readable records and count "
            "the lost ones") from None
    if pending:
        run(positions, pending)
    if expected is not None and read > expected:
        raise ShardReadError(f"{shard_path}: {counts(read)}: more records than the index "
                             "lists; the shard and index.json disagree (re-extract it)")
    lost = (expected - read) if expected is not None else 0
    if expected is not None and lost and not losses:
        if not skip_corrupt:
            raise ShardReadError(
                f"{shard_path}: {counts(read)}: the shard is short (truncated or replaced). "
                "Nothing of this shard was embedded; re-extract it (bin/extract), or pass "
                "--skip_corrupt to embed its readable records and count the lost ones")
        losses.append({"record": read, "n_records": None,
                       "error": f"the shard ends early: {counts(read)}"})
    known = sum(x["n_records"] for x in losses if x["n_records"] is not None)
    for x in losses:
        n = x["n_records"]
        if n is None:  # the rest of the shard: what the index says is missing
            n = max(lost - known, 0) if expected is not None else 0
            what = f"{LOST_PREFIX}shard unreadable from here on, {n} record(s)"
        else:
            what = f"{LOST_PREFIX}unreadable record"
        skip(x["record"], f"{what} ({counts(read)}): {x['error']}", n_records=n)
    keys = pd.DataFrame(columns)
    keys["split"] = split
    keys = keys[list(PATCH_KEYS)]
    dim = chunks[0].shape[1] if chunks else 0
    values = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return keys, values.astype(np.float32, copy=False), skipped


# --------------------------------------------------------------------------- parts (resume)
def shard_stamp(path: str) -> str:
    """Size and modification time of a shard: a saved part is reused only for the same."""
    if fs.is_url(path):
        import tensorflow as tf

        st = tf.io.gfile.stat(path)
        return f"{st.length}-{st.mtime_nsec}"
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


def part_path(out_dir: str, shard_file: str) -> str:
    """Where the embedding of one shard is kept until the tables are written (resume)."""
    return fs.join(out_dir, PARTS_DIR, shard_file + ".npz")


def save_part(path: str, model_id: str, stamp: str, keys: pd.DataFrame, values: np.ndarray,
              skipped: list[dict]) -> None:
    """Writes one shard's keys, values and skipped records atomically (see `load_part`)."""
    arrays: dict[str, np.ndarray] = {
        "meta": np.asarray([json.dumps({"model_id": model_id, "stamp": stamp,
                                        "skipped": skipped})]),
        "values": values,
    }
    for k in PATCH_KEYS:
        col = keys[k].to_numpy()
        arrays[f"key_{k}"] = (np.asarray([str(v) for v in col], dtype=str)
                              if k in _STRING_KEYS or k == "split" else col.astype(np.int64))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_part(path: str, model_id: str, stamp: str):
    """A saved part if it exists and matches the model and shard, else None."""
    if not fs.exists(path):
        return None
    try:
        with np.load(fs.readable(path), allow_pickle=False) as z:
            meta = json.loads(str(z["meta"][0]))
            if meta.get("model_id") != model_id or meta.get("stamp") != stamp:
                return None
            keys = pd.DataFrame({k: z[f"key_{k}"] for k in PATCH_KEYS})
            for k in _STRING_KEYS + ("split",):
                keys[k] = keys[k].astype(object)
            skipped = [{"n_records": 1, **row} for row in meta.get("skipped", [])]
            return keys, z["values"].astype(np.float32), skipped
    except (OSError, ValueError, KeyError):
        return None  # unreadable part: embed the shard again


# --------------------------------------------------------------------------- aggregation
def _count_images(patch: EmbeddingTable, by: tuple[str, ...]) -> np.ndarray:
    """Distinct images per group, in the group order of `aggregate` (sorted keys)."""
    grouped = patch.keys.groupby(list(by), sort=True, dropna=False)["image_id"].nunique()
    return grouped.to_numpy()


def _drop_patch_keys(table: EmbeddingTable) -> EmbeddingTable:
    """Drops patch position keys that `aggregate` keeps when they happen to be constant
    in every group (e.g. one patch per image): they mean nothing for a mean."""
    table.keys = table.keys.drop(columns=[c for c in ("patch_index", "x", "y")
                                          if c in table.keys.columns])
    return table


def aggregate_levels(patch: EmbeddingTable, gene_from: str = "patches",
                     levels: Sequence[str] = LEVELS) -> dict[str, EmbeddingTable]:
    """Image, donor and gene means of a patch table.

    Args:
      patch: patch-level table with at least image_id, gene_symbol, donor_id keys.
      gene_from: "patches": donor and gene = mean of all their patches (n_patches,
        n_images added); "images": mean of their image means (n_images and the total
        n_patches added).
      levels: which of "patch", "image", "donor", "gene" to return.

    Returns:
      level -> table, in the order of `LEVELS`.

    Raises:
      EmbedError: unknown `gene_from`.
    """
    if gene_from not in GENE_FROM:
        raise EmbedError(f"gene_from must be one of {GENE_FROM}, got {gene_from!r}")
    out: dict[str, EmbeddingTable] = {}
    image = _drop_patch_keys(aggregate(patch, LEVEL_KEYS["image"]))
    for level in ("donor", "gene"):
        if level not in levels:
            continue
        by = LEVEL_KEYS[level]
        if gene_from == "patches":
            table = _drop_patch_keys(aggregate(patch, by))
            table.keys["n_images"] = _count_images(patch, by)
        else:
            base = EmbeddingTable(image.keys.drop(columns=["n_patches"]), image.values,
                                  image.source)
            table = aggregate(base, by)
            table.keys["n_patches"] = (image.keys.groupby(list(by), sort=True, dropna=False)
                                       ["n_patches"].sum().to_numpy())
        out[level] = table
    result = {"patch": patch, "image": image, **out}
    return {lv: result[lv] for lv in LEVELS if lv in levels}


# --------------------------------------------------------------------------- metadata
def _manifest_path(config: EmbedConfig) -> tuple[str, str]:
    """(manifest to join, note): the --manifest, else the one index.json names."""
    if config.manifest == "none":
        return "", "no manifest joined (--manifest=none): record keys only"
    if config.manifest:
        return config.manifest, ""
    named = (load_index(config.records_dir).get("dataset") or {}).get("extra", {}).get(
        "manifest", "")
    if not named:
        return "", "index.json names no manifest: record keys only"
    if not fs.exists(named):
        return "", (f"the manifest index.json names ({named}) is not there: record keys "
                    "only (pass --manifest=PATH)")
    return named, ""


def with_manifest(keys: pd.DataFrame, manifest: pd.DataFrame | None,
                  manifest_path: str = "") -> tuple[pd.DataFrame, list[str], int]:
    """Record keys with unknown values made empty and the manifest's columns joined.

    Args:
      keys: the patch keys (`PATCH_KEYS`).
      manifest: a validated manifest, or None.
      manifest_path: its file; `path` values become absolute paths next to it.

    Returns:
      (keys, the manifest columns added, images of `keys` the manifest lacks).
    """
    keys = keys.copy()
    # Unknown ids are empty, not a sentinel: -1 is what a record holds for "no entrez id".
    entrez = pd.to_numeric(keys["entrez_id"], errors="coerce").astype("Int64")
    keys["entrez_id"] = entrez.mask(entrez < 0)
    for col in ("region", "study"):
        keys[col] = keys[col].mask(keys[col].astype(str) == "")
    if manifest is None or not len(keys):
        return keys, [], 0
    from ish_tf.data.manifest import image_path

    extra = [c for c in manifest.columns if c not in keys.columns]
    side = manifest[["image_id"] + extra].copy()
    if "path" in side.columns and manifest_path:
        side["path"] = [image_path(manifest_path, p) if isinstance(p, str) else p
                        for p in side["path"]]
    ids = pd.to_numeric(keys["image_id"]).astype("int64")
    joined = keys.assign(image_id=ids).merge(side, on="image_id", how="left", sort=False,
                                             validate="many_to_one")
    missing = int((~ids.isin(manifest["image_id"])).groupby(ids).first().sum())
    return joined.reset_index(drop=True), extra, missing


# --------------------------------------------------------------------------- driver
def selected_shards(records_dir: str, splits: Sequence[str]) -> list[dict]:
    """The index's shards of `splits` (all when empty), in split and shard order.

    Raises:
      EmbedError: a requested split without shards, no shards, or a listed shard that is
        not on disk (naming it).
    """
    index = load_index(records_dir)
    shards = sorted(index["shards"], key=lambda s: (s["split"], s["index"]))
    have = sorted({s["split"] for s in shards})
    if splits:
        missing = [s for s in splits if s not in have]
        if missing:
            raise EmbedError(f"{records_dir}: no completed shards of split(s) {missing}; "
                             f"splits with shards: {have or 'none'}")
        shards = [s for s in shards if s["split"] in splits]
    if not shards:
        raise EmbedError(f"{records_dir}: the index lists no completed shards")
    for s in shards:
        path = fs.join(records_dir, s["file"])
        if not fs.exists(path):
            raise EmbedError(f"{index_path(records_dir)} lists {s['file']} but it is "
                             f"not in {records_dir}")
    return shards


def note_size_mismatch(records_dir: str, metadata: dict) -> str:
    """Says (once, as a warning) that the records' images are resized to the model's
    input, with both sizes, when the records set and the export disagree.

    Returns:
      The line said, or "" when the sizes agree or one is unknown.
    """
    from absl import logging

    from ish_tf.data import shards as shard_index

    try:
        info = shard_index.load_dataset_info(records_dir)
    except Exception:  # noqa: BLE001 - an unreadable index is reported by the reader
        return ""
    stored = getattr(info, "patch_size", 0) or 0
    size = (metadata or {}).get("input_size") or 0
    if not stored or not size or int(stored) == int(size):
        return ""
    line = (f"{records_dir}: records are {stored}x{stored} px and the model takes "
            f"{size}x{size}: every image is resized to {size}x{size} (bilinear) before "
            "embedding")
    logging.warning("%s", line)
    return line


def embed_records(config: EmbedConfig, *, progress: bool | None = None,
                  desc: str = "embed") -> EmbedResult:
    """Embeds the records of `config.records_dir` with the SavedModel and writes the tables.

    Args:
      config: see `EmbedConfig`.
      progress: draw a progress bar (None: only on a terminal / ISH_TF_PROGRESS).
      desc: the progress bar's label (which model, where several are embedded).

    Returns:
      An `EmbedResult`.

    Raises:
      EmbedError: bad settings, no shards, an unusable signature, or nothing embedded.
      ish_tf.data.records.RecordsError: no or unreadable index.
    """
    config = config.validate()
    shards = selected_shards(config.records_dir, config.splits)
    served = ServedModel(config.saved_model, config.signature, config.output,
                         allow_foreign=config.allow_foreign_saved_model)
    note_size_mismatch(config.records_dir, served.metadata)
    fs.makedirs(fs.join(config.out_dir, PARTS_DIR))

    all_keys, all_values, skipped = [], [], []
    reused = embedded = 0
    seconds = 0.0
    total = sum(int(s.get("num_records", 0)) for s in shards)
    with Progress(total or None, desc=desc, enabled=progress, unit="records") as bar:
        for s in shards:
            path = fs.join(config.records_dir, s["file"])
            part = part_path(config.out_dir, s["file"])
            stamp = shard_stamp(path)
            loaded = load_part(part, served.model_id, stamp)
            if loaded is not None:
                reused += 1
                bar.update(int(s.get("num_records", 0)))
            else:
                start = time.perf_counter()
                expected = s.get("num_records")
                loaded = embed_shard(served, path, s["split"], config.batch_size, bar,
                                     expected=None if expected is None else int(expected),
                                     skip_corrupt=config.skip_corrupt)
                seconds += time.perf_counter() - start
                embedded += len(loaded[0])
                save_part(part, served.model_id, stamp, *loaded)
            keys, values, bad = loaded
            if len(keys):
                all_keys.append(keys)
                all_values.append(values)
            skipped.extend(bad)
    if not all_keys:
        raise EmbedError(f"{config.records_dir}: no record could be embedded "
                         f"({len(skipped)} skipped; see the reasons in "
                         f"{fs.join(config.out_dir, SKIPPED_NAME)})")
    dims = {v.shape[1] for v in all_values}
    if len(dims) != 1:
        raise EmbedError(f"{config.out_dir}/{PARTS_DIR}: parts of different widths {dims}; "
                         "delete the directory and rerun")
    manifest_path, manifest_note = _manifest_path(config)
    manifest = None
    if manifest_path:
        from ish_tf.data.manifest import ManifestError, read_manifest

        try:
            manifest = read_manifest(manifest_path)
        except ManifestError as e:
            if config.manifest:
                raise EmbedError(f"--manifest: {e}") from None
            manifest_path, manifest_note = "", f"manifest not joined ({e}): record keys only"
    keys, added, lacking = with_manifest(pd.concat(all_keys, ignore_index=True), manifest,
                                         manifest_path)
    if lacking:
        manifest_note = (f"{lacking} embedded image(s) are not in {manifest_path}: their "
                         "manifest columns are empty")
    patch = EmbeddingTable(keys, np.concatenate(all_values), served.path)

    ext = config.table_format
    name = served.metadata.get("family") or served.output or "embedding"
    tables, rows = {}, {}
    for level, table in aggregate_levels(patch, config.gene_from, config.levels).items():
        path = fs.join(config.out_dir, f"{LEVEL_FILES[level]}.{ext}")
        write_embedding_table(path, table, name=name)
        tables[level], rows[level] = path, len(table)
    skipped_path = fs.join(config.out_dir, SKIPPED_NAME)
    skipped_frame = pd.DataFrame(skipped, columns=_SKIPPED_COLUMNS)
    if fs.is_url(skipped_path):  # pandas writes no gfile URL: the same text, through gfile
        atomic_write_text(skipped_path, skipped_frame.to_csv(index=False))
    else:
        with atomic_path(skipped_path) as tmp:
            skipped_frame.to_csv(tmp, index=False)

    lost_by_shard: dict[str, int] = {}
    for row in skipped:
        if str(row.get("error", "")).startswith(LOST_PREFIX):
            lost_by_shard[row["shard"]] = lost_by_shard.get(row["shard"], 0) + int(
                row.get("n_records", 1))
    result = EmbedResult(
        out_dir=config.out_dir, saved_model=served.path, tables=tables, rows=rows,
        dim=patch.dim,
        skipped=sum(1 for r in skipped if not str(r.get("error", "")).startswith(LOST_PREFIX)),
        skipped_path=skipped_path, shards_reused=reused,
        patches_embedded=embedded, seconds=seconds,
        patches_per_sec=embedded / seconds if seconds > 0 else 0.0,
        records_lost=sum(lost_by_shard.values()), lost_by_shard=lost_by_shard,
        manifest=fs.abspath(manifest_path) if manifest_path else "",
        manifest_columns=added, manifest_note=manifest_note)
    summary: dict[str, Any] = dataclasses.asdict(result)
    summary.update({"signature": served.signature, "feeds": served.feeds,
                    "output": served.output,
                    "fingerprint": served.fingerprint, "gene_from": config.gene_from,
                    "records_dir": fs.abspath(config.records_dir),
                    "splits": sorted({s["split"] for s in shards}),
                    "family": served.metadata.get("family")})
    atomic_write_text(fs.join(config.out_dir, SUMMARY_NAME),
                      json.dumps(summary, indent=1, sort_keys=True) + "\n")
    # The tables are complete: the resume cache would only double the disk use.
    for s in shards:
        part = part_path(config.out_dir, s["file"])
        fs.remove(part)
    parts_dir = fs.join(config.out_dir, PARTS_DIR)
    if fs.isdir(parts_dir) and not fs.listdir(parts_dir):
        fs.rmtree(parts_dir)
    return result


# --------------------------------------------------------------------------- images
def _as_png_bytes(image: np.ndarray, what: str) -> bytes:
    """Encodes an (H, W) or (H, W, C) array of stored pixel values (0..255) as PNG."""
    import tensorflow as tf

    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise EmbedError(f"{what}: expected an (H, W) or (H, W, 1|3|4) image array, got "
                         f"shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.isfinite(arr).all():
            raise EmbedError(f"{what}: holds NaN or infinite pixel values")
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return tf.io.encode_png(arr).numpy()


def embed_images(saved_model: str, images: Sequence, *, ids: Sequence | None = None,
                 batch_size: int = 64, output: str | None = None, as_anndata: bool = False,
                 allow_foreign_saved_model: bool = False):
    """Embeds image files or arrays through an exported SavedModel (no records needed).

    Image exports (1 or 3 channels) take encoded images through `serving_default`, which
    decodes and resizes them to the model's input in the graph, exactly as served: a file
    is sent as its bytes (JPEG or PNG), an array (H, W[, C]) of stored pixel values
    0..255 is PNG-encoded first. Exports of raw pixels (other channel counts) take
    arrays of exactly the model's input shape through the decoded-input signature.

    Args:
      saved_model: an export base EXPORT/<name> (newest version) or a version directory
        written by bin/export.
      images: file paths (str or os.PathLike), encoded bytes, or numpy arrays.
      ids: one label per image for the `image` column / obs index (default: the path,
        or the position for arrays and bytes).
      batch_size: images per call of the signature.
      output: output of the signature (default: the export's first, e.g. embedding).
      as_anndata: return an AnnData (obs: image; obsm["X_<family>"]) instead.
      allow_foreign_saved_model: load a SavedModel without ish_tf's export metadata
        (a SavedModel is code: only from a trusted source).

    Returns:
      A DataFrame with column `image` then dim_000 ... dim_<D-1>, one row per image in
      order; or an AnnData when `as_anndata`.

    Raises:
      EmbedError: an unreadable file or image, a bad array, or an unusable SavedModel
        (the message names the image).
    """
    import tensorflow as tf

    from ish_tf.data.embeddings import dim_names

    images = list(images)
    if not images:
        raise EmbedError("embed_images: no images given")
    if ids is not None and len(ids) != len(images):
        raise EmbedError(f"embed_images: {len(ids)} ids for {len(images)} images")
    if batch_size < 1:
        raise EmbedError(f"batch size must be >= 1, got {batch_size}")
    served = ServedModel(saved_model, "serving_default", output,
                         allow_foreign=allow_foreign_saved_model)
    labels = []
    for i, item in enumerate(images):
        if ids is not None:
            labels.append(ids[i])
        elif isinstance(item, (str, os.PathLike)):
            labels.append(os.fspath(item))
        else:
            labels.append(i)

    def what(i: int) -> str:
        return f"image {i} ({labels[i]})"

    def load(i: int, item):
        if isinstance(item, (str, os.PathLike)):
            try:
                with open(item, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise EmbedError(f"{what(i)}: cannot read ({e.strerror or e})") from None
            return data if served.feeds == "image_bytes" else _decode_file(data, what(i))
        if isinstance(item, (bytes, bytearray)):
            return bytes(item) if served.feeds == "image_bytes" else _decode_file(
                bytes(item), what(i))
        if served.feeds == "image_bytes":
            return _as_png_bytes(item, what(i))
        return np.asarray(item, dtype=np.float32)

    pixels_fn = None
    if served.metadata.get("input_transform"):
        raise EmbedError(f"{served.path}: this export normalises its raw input with "
                         f"per-plate statistics ({served.metadata['input_transform']['kind']}), "
                         "which arrays alone do not identify: embed its records with "
                         "bin/embed, or call serving_default with experiment and plate")
    if served.feeds != "image_bytes":
        name = (served.metadata.get("signature_names") or {}).get("decoded")
        if not name or name not in served._loaded.signatures:
            raise EmbedError(f"{served.path}: this export takes neither encoded images nor "
                             "pixels (a vector model?): embed its records with bin/embed")
        pixels_fn = served._loaded.signatures[name]
        pixels_key = next(iter(pixels_fn.structured_input_signature[1]))

    chunks = []
    for start in range(0, len(images), batch_size):
        batch = [load(i, images[i]) for i in range(start, min(start + batch_size,
                                                               len(images)))]
        try:
            if pixels_fn is None:
                chunks.append(served(batch))
            else:
                out = pixels_fn(**{pixels_key: tf.convert_to_tensor(np.stack(batch))})
                values = out[served.output].numpy().astype(np.float32)
                chunks.append(values.reshape(len(batch), -1))
        except (tf.errors.InvalidArgumentError, ValueError) as e:
            # Find the image that fails, to name it.
            for j, one in enumerate(batch):
                try:
                    if pixels_fn is None:
                        served([one])
                    else:
                        pixels_fn(**{pixels_key: tf.convert_to_tensor(one[None])})
                except (tf.errors.InvalidArgumentError, ValueError) as e1:
                    msg = getattr(e1, "message", str(e1)).strip().splitlines()[0]
                    raise EmbedError(f"{what(start + j)}: the model cannot take it "
                                     f"({msg})") from None
            raise EmbedError(f"images {start}..{start + len(batch) - 1}: {e}") from None
    values = np.concatenate(chunks).astype(np.float32, copy=False)
    frame = pd.concat([pd.DataFrame({"image": labels}),
                       pd.DataFrame(values, columns=dim_names(values.shape[1]))], axis=1)
    if not as_anndata:
        return frame
    name = served.metadata.get("family") or served.output or "embedding"
    return EmbeddingTable(frame[["image"]].astype({"image": str}), values,
                          served.path).to_anndata(name)


def _decode_file(data: bytes, what: str) -> np.ndarray:
    """Pixels of a JPEG/PNG file for exports that take pixels."""
    import tensorflow as tf

    try:
        return tf.cast(tf.io.decode_image(data, expand_animations=False),
                       tf.float32).numpy()
    except tf.errors.InvalidArgumentError as e:
        raise EmbedError(f"{what}: not a JPEG/PNG image ({e.message.splitlines()[0]})") from None

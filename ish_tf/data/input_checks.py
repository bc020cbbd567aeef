"""What the record readers check, and how their failures are named.

Before and while `ish_tf.data.pipeline` reads a split: the shards hold as many records
as index.json lists (a truncated shard never reads as fewer records), the split can feed
P×K batches, image bytes are what the set holds before they are decoded; and a failure
inside tf.data becomes one line naming the shard, the record and its byte offset
(`describe_input_error`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from ish_tf.data import framing, records, shards
from ish_tf.data.inputs import InputSpec
from ish_tf.data.records import RecordsError


def check_shard_counts(records_dir: str, split: str, files: Sequence[str]) -> None:
    """The split holds records, and each uncompressed shard as many as index.json lists
    (a truncated shard must never read as fewer records)."""
    counts = index_record_counts(records_dir, split, files)
    if sum(counts) == 0:
        raise no_records_error(records_dir, split)
    for f, n in zip(files, counts, strict=True):
        if shards.compression_of(f) is None:
            framing.checked_record_offsets(f, n)


def identity_name(records_dir: str) -> str:
    info = shards.load_dataset_info(records_dir)
    return (info.identity_name if info is not None else "") or records.DEFAULT_IDENTITY_NAME


def index_record_counts(records_dir: str, split: str, files: Sequence[str]) -> list[int]:
    """The number of records index.json lists for each of these shard files."""
    listed = {os.path.abspath(os.path.join(records_dir, s["file"])): int(s["num_records"])
              for s in shards.load_index(records_dir)["shards"] if s["split"] == split}
    return [listed[os.path.abspath(f)] for f in files]


def no_records_error(records_dir: str, split: str) -> RecordsError:
    return RecordsError(
        f"{records_dir}: split '{split}' has no records (its shards in {shards.INDEX_NAME} "
        "hold 0 records: the extraction found no patches); check what bin/extract "
        "reported (tissue masks, patch size, split fractions) and extract again")


def check_pk_identities(records_dir: str, split: str, P: int, K: int) -> int:
    """Checks that a split can feed P×K batches of distinct identities (triplet training).

    Args:
      records_dir: directory written by `bin/extract`.
      split: the split to train on.
      P, K: identities per batch and records per identity.

    Returns:
      The number of identities of the split with at least K records.

    Raises:
      RecordsError: the split has no records, fewer than 2 identities with at least K
        records, or fewer than P; the message names the split and the counts.
    """
    extents = shards.gene_extents(records_dir, split)
    what = identity_name(records_dir)
    total = sum(e.count for e in extents)
    enough = sum(e.count >= K for e in extents)
    if total == 0:
        raise no_records_error(records_dir, split)
    if enough < max(P, 2):
        raise RecordsError(
            f"{records_dir}: split '{split}' has {enough} {what}s with at least K={K} "
            f"records ({len(extents)} {what}s, {total} records in all), but a P×K batch "
            f"needs P={P} (and at least 2): lower P or K, or extract more patches per {what}")
    return enough


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _image_bytes_ok(encoded: tf.Tensor, spec: InputSpec) -> tuple[tf.Tensor, str] | None:
    """(ok, what): whether image bytes (any shape of tf.string) are what the set holds,
    and the message when not; None where the decoder itself checks (raw images of a
    spec without a fixed size)."""
    if records.stores_raw(spec.channels, spec.dtype):
        if spec.height is None or spec.width is None:
            return None  # the decoder checks the size against image/height and width
        want = spec.height * spec.width * spec.channels * np.dtype(spec.dtype).itemsize
        return (tf.equal(tf.strings.length(encoded), want),
                f"image/encoded is not the {want} bytes of a raw {spec.describe()} image")
    ok = tf.logical_or(tf.equal(tf.strings.substr(encoded, 0, 3), _JPEG_MAGIC),
                       tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_MAGIC))
    return ok, "image/encoded is neither a JPEG nor a PNG image (non-image bytes)"


def checked_image_bytes_batch(feats: dict, spec: InputSpec, where_of) -> dict:
    """Parsed records (`tf.io.parse_example`) whose image bytes are checked to be what the
    set holds before they are decoded, so a record of non-image bytes fails naming its
    shard and number instead of with a bare decoder error: one check for the whole
    batch, and the name of the first bad record built only for the message.

    Args:
      feats: batched features, `image/encoded` of shape (B,).
      spec: the set's input spec.
      where_of: function of a record's position in the batch (int64 scalar tensor) that
        returns its 'SHARD: record N' (tf.string scalar).
    """
    if spec.kind != "image":
        return feats
    encoded = feats["image/encoded"]
    checked = _image_bytes_ok(encoded, spec)
    if checked is None:
        return feats
    ok, what = checked
    # The message reads "[SHARD: record N] [what]" (parsed back by describe_input_error).
    first_bad = tf.argmin(tf.cast(ok, tf.int32), output_type=tf.int64)
    check = tf.debugging.Assert(tf.reduce_all(ok), [where_of(first_bad), what])
    with tf.control_dependencies([check]):
        return dict(feats, **{"image/encoded": tf.identity(encoded)})


def find_corrupt_record(files: Sequence[str]) -> str | None:
    """Reads shards with TensorFlow's checked reader until a record fails.

    For the error path of the plain reader, whose `DataLossError` says only "corrupted
    record at OFFSET": it reads every byte of the shards, so use it once an error is
    known.

    Returns:
      "SHARD: record N at byte B: ..." for the first bad record, or None.
    """
    for path in files:
        options = tf.io.TFRecordOptions(compression_type=shards.compression_of(path) or "")
        n = 0
        try:
            for _ in tf.compat.v1.io.tf_record_iterator(path, options):
                n += 1
        except tf.errors.OpError as e:
            at = ""
            if shards.compression_of(path) is None:
                try:
                    at = f" at byte {int(framing.record_offsets(path)[n])}"
                except (RecordsError, IndexError):
                    at = ""
            return (f"{path}: record {n}{at}: {e.message} (corrupt or truncated shard: "
                    "extract it again)")
    return None


_TF_NOISE = re.compile(r"^\{\{function_node [^}]*\}\}\s*|\s*\[Op:[^\]]*\].*$|"
                       r"Error in user-defined function passed to \S+ transformation with "
                       r"iterator: \S+: ")


def describe_input_error(error: tf.errors.OpError, records_dir: str | None = None,
                         split: str | None = None) -> str:
    """One line for an error an input pipeline of this module raised, naming the shard
    (and the record) wherever it can.

    Args:
      error: what iterating the dataset raised.
      records_dir, split: what the pipeline reads (to find a corrupt record the plain
        reader met, and to name the data otherwise).
    """
    text = error.message
    found = re.search(r"RecordsError: ([^\n]*)", text)  # the P×K reader's checks
    if found:
        return found.group(1)
    found = re.search(r"assertion failed: \[([^\n]*?)\] \[([^\n]*?)\]", text)  # `checked_image_bytes_batch`
    if found:
        return f"{found.group(1)}: {found.group(2)}"
    if isinstance(error, tf.errors.DataLossError) and records_dir and split:
        with contextlib.suppress(RecordsError, tf.errors.OpError, OSError):
            from ish_tf.data.pipeline import list_shards  # pipeline imports this module

            found = find_corrupt_record(list_shards(records_dir, split))
            if found:
                return found
    first = _TF_NOISE.sub("", text.strip().splitlines()[0] if text.strip() else type(error).__name__)
    where = f"{records_dir} (split '{split}')" if records_dir else "the input pipeline"
    return f"{where}: reading or decoding a record failed: {first}"



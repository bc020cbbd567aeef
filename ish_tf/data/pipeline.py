"""tf.data input pipelines over the record sets written by `bin/extract` (or
`ish_tf.data.record_sets.write_record_set`).

Two readers, both decoding per the record set's input kind (`shards.records_input_spec`):
images as float32 (B, H, W, C) with the stored values (in [0, 255] for the 3-channel
uint8 ISH patches: (B, R, R, 3)), vectors as float32 (B, D). The models carry their own
preprocessing, so exported models accept the same input:

* `patch_dataset`: the plain shuffled reader (classifiers, autoencoders, evaluation,
  and with `with_keys=True` the embedding stage).
* `pk_dataset`: P identities (genes) × K records per batch for triplet training with
  batch-hard mining (Hermans et al. 2017; Abed-Esfahani et al. 2022).

Flips apply to images only; vectors pass unchanged.

Determinism. Every random choice (file order, shuffling, the P×K gene and patch
draws, the flips) comes from the `seed`; with `deterministic=True` two runs with the
same seed produce identical batches. That is what makes a failing batch
reproducible while debugging, and what lets a run on N replicas be compared to a run
on one replica (the multi-replica equality test): the P×K reader gives the replicas
slices of exactly the global batch a single replica would see. The P×K draws and the
flips are stateless; `patch_dataset`'s shuffles are tf.data's, which combine their seed
with TensorFlow's global one (`tf.random.set_seed`): the trainer and bin/tune's scoring
set it from --seed before building a dataset, and other callers should too.

Scale. The P×K reader never loads the dataset: the index (`shards.gene_extents`)
says where each gene's contiguous records lie, a small per-shard offsets file
(`framing.record_offsets`) gives each record's byte position, and each batch reads
just its P·K records with positioned reads. Memory is O(number of records × 8 bytes)
for the memory-mapped offsets, independent of image size.

Nothing silent. Both readers check each shard against the record count index.json
lists (a truncated shard never reads as fewer records) and check that an image record
holds image bytes before decoding it, naming the shard and record when not. The plain
reader's `TFRecordDataset` checks the CRCs itself; the P×K reader's positioned reads
check each record's framing (`framing.check_record_framing`) before parsing.
`describe_input_error` turns what iterating either reader raised into one line naming
the shard, record and offset.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import zlib
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from ish_tf.data import framing, records, shards
from ish_tf.data.input_checks import (
    check_shard_counts,
    checked_image_bytes_batch,
    identity_name,
    index_record_counts,
    no_records_error,
)
from ish_tf.data.inputs import InputSpec
from ish_tf.data.records import RecordsError

AUTOTUNE = tf.data.AUTOTUNE

# Scalar features returned by `patch_dataset(with_keys=True)`, in this order.
KEY_FEATURES: tuple[str, ...] = (
    "image_id", "patch_index", "x", "y", "source_size", records.IDENTITY_KEY,
    records.IDENTITY_INDEX_KEY, "entrez_id", records.GROUP_KEY, records.GROUP_INDEX_KEY,
    "region", "study", "label")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Input-pipeline options shared by the training, tuning and embedding commands.

    Attributes:
      flips: random left-right and up-down flips while training.
      standardize: per-image standardisation (mean 0, std 1) instead of [0, 255].
      shuffle_buffer: records held by the shuffle of the plain reader. Records of a
        shard are grouped by gene, so this buffer (together with `cycle_length`
        shards read at once) is what mixes genes within a batch.
      deterministic: identical batches for identical seeds (slower when one slow
        element holds up the others).
      cycle_length: shards read concurrently by the plain reader (0: TensorFlow's
        default, the number of CPU cores).
    """

    flips: bool = True
    standardize: bool = False
    shuffle_buffer: int = 4096
    deterministic: bool = False
    cycle_length: int = 0

    def reader_kwargs(self) -> dict:
        """Keyword arguments for `patch_dataset`."""
        return {"flips": self.flips, "standardize": self.standardize,
                "shuffle_buffer": self.shuffle_buffer, "deterministic": self.deterministic,
                "cycle_length": self.cycle_length or None}

    def pk_kwargs(self) -> dict:
        """Keyword arguments for `pk_dataset`."""
        return {"flips": self.flips, "standardize": self.standardize,
                "deterministic": self.deterministic}


# --------------------------------------------------------------------------- files
def list_shards(records_dir: str, split: str) -> list[str]:
    """Completed shard files of a split, from the index (temporary/partial files ignored).

    Args:
      records_dir: directory written by `bin/extract`.
      split: train | validation | test.

    Returns:
      Absolute paths in shard order.

    Raises:
      RecordsError: no index, no completed shard of the split, or a listed shard missing.
    """
    index = shards.load_index(records_dir)
    listed = sorted((s for s in index["shards"] if s["split"] == split),
                    key=lambda s: s["index"])
    if not listed:
        have = sorted({s["split"] for s in index["shards"]})
        raise RecordsError(f"{records_dir}: split '{split}' has no completed shards "
                           f"(splits with shards: {', '.join(have) or 'none'})")
    paths = []
    for s in listed:
        path = os.path.abspath(os.path.join(records_dir, s["file"]))
        if not os.path.exists(path):
            raise RecordsError(f"{shards.index_path(records_dir)} lists {s['file']} "
                               f"but it is not in {records_dir}")
        paths.append(path)
    return paths


def _compression(files: Sequence[str]) -> str | None:
    kinds = {shards.compression_of(f) for f in files}
    if len(kinds) > 1:
        raise RecordsError(f"shards mix GZIP and uncompressed files: {list(files)[:4]}...")
    return kinds.pop()


def _patch_size(records_dir: str | None) -> int | None:
    if records_dir is None:
        return None
    info = shards.load_dataset_info(records_dir)
    return info.patch_size if info is not None and info.patch_size > 0 else None


def _input_spec(records_dir: str | None, patch_size: int | None,
                input_spec: InputSpec | None) -> InputSpec:
    """The spec to decode with: given, else the set's (3-channel images without a set);
    `patch_size` fixes an image size the spec leaves open."""
    if input_spec is None:
        input_spec = (shards.records_input_spec(records_dir) if records_dir is not None
                      else InputSpec.image(3))
    if input_spec.kind == "image" and patch_size and input_spec.height is None:
        input_spec = dataclasses.replace(input_spec, height=patch_size, width=patch_size)
    return input_spec


def _decode_keys(spec: InputSpec) -> list[str]:
    """Features to parse for the payload of a record of `spec`."""
    return ["vector"] if spec.kind == "vector" else records.image_keys(spec)


def _decode_payload(feats: dict, spec: InputSpec) -> tf.Tensor:
    """uint8/uint16 (H, W, C) image or float32 (D,) vector of a parsed record."""
    if spec.kind == "vector":
        return records.decode_vector(feats, spec.dim or None)
    return records.decode_image(feats, spec=spec)


def _decode_records(serialized: tf.Tensor, spec: InputSpec, where_of,
                    keys: Sequence[str] = ()) -> tuple[tf.Tensor, dict]:
    """A batch of serialized records, parsed in one `tf.io.parse_example`, checked as a
    batch, and decoded record by record (images) or as a batch (vectors).

    Args:
      serialized: tf.string (B,).
      spec: the set's input spec.
      where_of: function of a record's position in the batch (int64 scalar) that gives
        its 'SHARD: record N', for the error message of a bad record.
      keys: further scalar features to parse (returned in the dict).

    Returns:
      (payload, feats): images (B, H, W, C) of the spec's dtype or float32 vectors (B, D);
      feats maps each of `keys` to a (B,) tensor.
    """
    decode_keys = _decode_keys(spec)
    feats = tf.io.parse_example(
        serialized, records.feature_spec(decode_keys + [k for k in keys if k not in decode_keys],
                                         spec.kind))
    if spec.kind == "vector":
        vectors = feats["vector"]  # ragged (B, None)
        lengths = vectors.row_lengths()
        want = spec.dim if spec.dim else lengths[:1]
        ok = tf.equal(lengths, want)
        first_bad = tf.argmin(tf.cast(ok, tf.int32), output_type=tf.int64)
        what = (f"vector has another length than the set's {spec.dim}" if spec.dim else
                "vector has another length than the first record of its batch")
        check = tf.debugging.Assert(tf.reduce_all(ok), [where_of(first_bad), what])
        with tf.control_dependencies([check]):
            payload = vectors.to_tensor(shape=[None, spec.dim or None])
        return payload, feats
    feats = checked_image_bytes_batch(feats, spec, where_of)
    # Decoding stays per record (tf.map_fn in the batch's map call): parallel over
    # batches, with no per-record tf.data element to schedule.
    payload = tf.map_fn(lambda f: records.decode_image(f, spec=spec),
                        {k: feats[k] for k in decode_keys},
                        fn_output_signature=tf.TensorSpec(spec.shape, tf.as_dtype(spec.dtype)))
    return payload, feats


@tf.function(jit_compile=True)
def _flip_and_cast(images: tf.Tensor, flips: tf.Tensor) -> tf.Tensor:
    # XLA fuses the per-image selects, the reversals and the cast into one pass over
    # the batch, so the flips cost about what the float32 cast costs alone.
    x = tf.where(flips[:, 0, None, None, None], tf.reverse(images, [2]), images)
    x = tf.where(flips[:, 1, None, None, None], tf.reverse(x, [1]), x)
    return tf.cast(x, tf.float32)


def _prepare_batch(payload: tf.Tensor, spec: InputSpec, flips: tf.Tensor | None,
                   standardize: bool) -> tf.Tensor:
    """A decoded batch as the readers return it: images flipped as `flips` (B, 2) says,
    float32, optionally standardised per image (the same values as `augment`); vectors
    as float32."""
    if spec.kind == "vector":
        return tf.cast(payload, tf.float32)
    images = (tf.cast(payload, tf.float32) if flips is None
              else _flip_and_cast(payload, flips))
    if standardize:
        images = tf.image.per_image_standardization(images)
    return images



# --------------------------------------------------------------------------- preprocessing
def decode_batch(serialized: tf.Tensor, patch_size: int | None = None,
                 input_spec: InputSpec | None = None) -> tf.Tensor:
    """Decodes a batch of serialized records to images (or vectors).

    Args:
      serialized: tf.string (B,) serialized records.
      patch_size: R when known, for a static shape (where the spec fixes none).
      input_spec: the set's input kind (default: 3-channel uint8 images).

    Returns:
      uint8 (B, R, R, 3) by default; (B, H, W, C) of the spec's dtype for images,
      float32 (B, D) for vectors.
    """
    spec = _input_spec(None, patch_size, input_spec)
    return tf.map_fn(lambda s: decode_one(s, input_spec=spec), serialized,
                     fn_output_signature=tf.TensorSpec(
                         spec.shape, tf.float32 if spec.kind == "vector"
                         else tf.as_dtype(spec.dtype)))


def decode_one(serialized: tf.Tensor, patch_size: int | None = None,
               input_spec: InputSpec | None = None) -> tf.Tensor:
    """Decodes one serialized record (the per-element form of `decode_batch`, which
    parallel `Dataset.map` runs faster than a batched map_fn).

    Returns:
      uint8 (R, R, 3) by default; (H, W, C) of the spec's dtype for images, float32
      (D,) for vectors.
    """
    spec = _input_spec(None, patch_size, input_spec)
    feats = records.parse_example(serialized, _decode_keys(spec), spec.kind)
    return _decode_payload(feats, spec)


def flip_bits(seed: tf.Tensor, batch_size: int | tf.Tensor | None = None) -> tf.Tensor:
    """Random flip decisions from a stateless seed.

    Args:
      seed: int (2,) stateless seed.
      batch_size: B, or None for the decisions of a single image.

    Returns:
      bool (B, 2) or (2,): [..., 0] = left-right flip, [..., 1] = up-down flip.
    """
    shape = [2] if batch_size is None else tf.stack([batch_size, 2])
    return tf.random.stateless_uniform(shape, seed) < 0.5


def augment_image(image: tf.Tensor, flip: tf.Tensor | None = None,
                  standardize: bool = False) -> tf.Tensor:
    """Flips one image as told, casts it to float32, optionally standardises it.

    Flipping happens on the uint8 image and only the chosen branch runs (`tf.cond`),
    which keeps augmentation cheap next to JPEG decoding.

    Args:
      image: (H, W, 3) uint8 or float.
      flip: bool (2,) (left-right, up-down) from `flip_bits`, or None for no flips.
      standardize: per-image standardisation (`tf.image.per_image_standardization`:
        mean 0, std 1 over the image's pixels and channels).

    Returns:
      float32 (H, W, 3), in [0, 255] unless standardised.
    """
    if flip is not None:
        image = tf.cond(flip[0], lambda: tf.reverse(image, axis=[1]), lambda: image)
        image = tf.cond(flip[1], lambda: tf.reverse(image, axis=[0]), lambda: image)
    image = tf.cast(image, tf.float32)
    if standardize:
        image = tf.image.per_image_standardization(image)
    return image


def augment(images: tf.Tensor, flips: tf.Tensor | None = None,
            standardize: bool = False) -> tf.Tensor:
    """`augment_image` over a batch (eager use and tests; the pipelines use the fused
    `_prepare_batch`, which gives the same values).

    Args:
      images: (B, H, W, 3) uint8 or float.
      flips: bool (B, 2), or None for no flips.
      standardize: per-image standardisation.

    Returns:
      float32 (B, H, W, 3).
    """
    images = tf.convert_to_tensor(images)
    if flips is None:
        return tf.map_fn(lambda x: augment_image(x, None, standardize), images,
                         fn_output_signature=tf.float32)
    return tf.map_fn(lambda a: augment_image(a[0], a[1], standardize),
                     (images, tf.convert_to_tensor(flips)), fn_output_signature=tf.float32)


def _options(deterministic: bool) -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = deterministic
    return options


# --------------------------------------------------------------------------- plain reader
def patch_dataset(source: str | Sequence[str], split: str | None = None, *, batch_size: int,
                  training: bool, flips: bool = True, standardize: bool = False,
                  shuffle_buffer: int = 4096, deterministic: bool = False, seed: int = 0,
                  input_context: tf.distribute.InputContext | None = None,
                  label_key: str | None = records.IDENTITY_INDEX_KEY, drop_remainder: bool | None = None,
                  with_keys: bool = False, repeat: bool | None = None,
                  cycle_length: int | None = None,
                  patch_size: int | None = None,
                  input_spec: InputSpec | None = None) -> tf.data.Dataset:
    """The plain shuffled reader of records (images or vectors, per the set's input kind).

    Steps: file list (sharded over input pipelines, then shuffled with the seed while
    training) -> repeat -> `interleave` of `TFRecordDataset`s -> record shuffle
    (training) -> batch of serialized records -> per batch, batches in parallel: one
    `tf.io.parse_example`, one check of the image bytes, decoding record by record,
    flips (training; drawn with `flip_bits` from the seed and the batch's number in
    the stream) fused with the float32 cast, standardisation -> prefetch. Working per
    batch pays tf.data's per-element overhead once per batch instead of once per
    record (bench/bench_pipeline.py measures what is left beside decoding).

    Args:
      source: a records directory (then `split` is required) or a list of shard files.
      split: split to read from a records directory.
      batch_size: GLOBAL batch size; with `input_context` each pipeline yields
        `input_context.get_per_replica_batch_size(batch_size)`.
      training: shuffle, flip and (by default) repeat and drop the remainder.
      flips: random left-right and up-down flips (training only).
      standardize: per-image standardisation (mean 0, std 1) instead of [0, 255].
      shuffle_buffer: records in the shuffle buffer (training only).
      deterministic: identical output order for identical seeds.
      seed: seed of file order, shuffling and flips.
      input_context: from `strategy.distribute_datasets_from_function`: shards are
        split over `num_input_pipelines` (each pipeline reads a disjoint subset of
        files), so there must be at least as many shards as pipelines.
      label_key: int feature used as label (cast to int32; default the identity index),
        or None to yield images only.
      drop_remainder: drop the last partial batch (default: `training`).
      with_keys: yield (images, features) where features maps each of
        `KEY_FEATURES` to a (B,) tensor (tf.string or int64); no shuffling, no
        augmentation, no repeat (for embedding).
      repeat: repeat forever (default: `training` and not `with_keys`).
      cycle_length: shards read at once (None: TensorFlow's default).
      patch_size: R for static shapes (default: from the directory's index).
      input_spec: what the records hold (default: from the directory's index;
        3-channel images for a list of files).

    Returns:
      Dataset of `(images float32 (B, H, W, C), labels int32 (B,))` ((B, R, R, 3) for
      ISH patches; `(vectors float32 (B, D), labels)` for a vector set), or of
      images only when `label_key` is None, or of `(images, features)` when
      `with_keys`. Flips and standardisation apply to images only.

    Raises:
      RecordsError: no shards, no records, an uncompressed shard holding another number
        of records than index.json lists, too few shards for the input pipelines, mixed
        compression. (A corrupt or non-image record raises while iterating; see
        `describe_input_error`.)
      ValueError: bad batch size or label key.
    """
    if isinstance(source, str):
        if split is None:
            raise ValueError("patch_dataset: give `split` when `source` is a records directory")
        files = list_shards(source, split)
        check_shard_counts(source, split, files)
        patch_size = patch_size or _patch_size(source)
        spec = _input_spec(source, patch_size, input_spec)
    else:
        files = [os.fspath(f) for f in source]
        if not files:
            raise RecordsError("patch_dataset: empty list of shard files")
        spec = _input_spec(None, patch_size, input_spec)
    if label_key is not None and label_key not in records.SCALAR_KEYS:
        raise ValueError(f"label_key '{label_key}' is not a scalar record feature; "
                         f"choose one of {records.SCALAR_KEYS}")
    if with_keys:
        training = False
    drop_remainder = training if drop_remainder is None else drop_remainder
    repeat = training if repeat is None else repeat
    augmenting = training and flips and spec.kind == "image"

    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
        n, i = input_context.num_input_pipelines, input_context.input_pipeline_id
        if len(files) < n:
            raise RecordsError(f"cannot split {len(files)} shard file(s) over {n} input "
                               "pipelines; extract with more shards")
        files = files[i::n]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    compression = _compression(files)

    # Shards by number: each record carries (shard number, record number), so a record
    # that does not decode is reported by name, and no string is built per record.
    file_names = tf.constant(files)
    ds = tf.data.Dataset.range(len(files))
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        # Repeat the (reshuffled) file list rather than the records: the record shuffle
        # buffer then never drains and refills at epoch boundaries.
        ds = ds.repeat()
    ds = ds.interleave(
        lambda f: tf.data.Dataset.zip(
            tf.data.Dataset.from_tensors(f).repeat(),
            tf.data.TFRecordDataset(file_names[f], compression_type=compression or "")
            .enumerate()),
        cycle_length=cycle_length, block_length=1, num_parallel_calls=AUTOTUNE,
        deterministic=deterministic or with_keys)
    if training and shuffle_buffer > 1:
        ds = ds.shuffle(shuffle_buffer, seed=seed + 1, reshuffle_each_iteration=True)
    order = deterministic or with_keys
    keys = list(KEY_FEATURES) if with_keys else ([label_key] if label_key else [])

    # Batch the serialized records first: one parse, one check and one flip-and-cast per
    # batch, decoding record by record inside the batch's map call. The batch counter
    # seeds the batch's flips, so they do not depend on threads.
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).enumerate()

    def parse(t, element):
        file_id, (record, serialized) = element

        def where_of(i):
            return tf.strings.join([file_names[file_id[i]], ": record ",
                                    tf.strings.as_string(record[i])])

        payload, feats = _decode_records(serialized, spec, where_of, keys)
        flip = (flip_bits(tf.stack([tf.cast(seed, tf.int64), t]), tf.shape(serialized)[0])
                if augmenting else None)
        images = _prepare_batch(payload, spec, flip, standardize)
        if with_keys:
            return images, {k: feats[k] for k in keys}
        if label_key is None:
            return images
        return images, tf.cast(feats[label_key], tf.int32)

    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=order)
    return ds.prefetch(AUTOTUNE).with_options(_options(order))


# --------------------------------------------------------------------------- P x K reader
class PKSampler:
    """The P×K draws as plain numpy: which records make up global batch t.

    Epoch e is a seeded permutation of the genes cut into `G // P` groups of P (the
    remainder of each epoch is left out, as in the triplet-reid reference code), so
    genes are drawn without replacement within an epoch and reshuffled every epoch.
    For each chosen gene with n records, K records are the first K of a permutation
    of `arange(max(n, K)) % n`: without replacement when n ≥ K, otherwise every
    record appears ⌊K/n⌋ or ⌈K/n⌉ times.

    Batch t depends only on (seed, t), so any batch can be drawn directly (resume).

    Args:
      counts: (G,) records per gene.
      P, K: genes per batch and records per gene.
      seed: seed of every draw.
      flips: also draw flip decisions.

    Raises:
      ValueError: P > G, or P, K < 1.
    """

    def __init__(self, counts: Sequence[int], P: int, K: int, seed: int = 0,
                 flips: bool = True):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.G = len(self.counts)
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be >= 1, got P={P}, K={K}")
        if P > self.G:
            raise ValueError(f"P={P} genes per batch but the split has only {self.G} genes "
                             "with records; lower --P")
        if (self.counts < 1).any():
            raise ValueError("every gene given to PKSampler needs at least one record")
        self.P, self.K, self.seed, self.flips = P, K, seed, flips
        self.batches_per_epoch = self.G // P
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def _epoch_genes(self, epoch: int) -> np.ndarray:
        cache = self._epoch_cache  # one read: parallel map calls may replace it
        if cache is None or cache[0] != epoch:
            cache = (epoch, np.random.default_rng([self.seed, 0, epoch]).permutation(self.G))
            self._epoch_cache = cache
        return cache[1]

    def batch(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Draws global batch t.

        Returns:
          genes int64 (P*K,): position of each record's gene in `counts`;
          records int64 (P*K,): record number within its gene (0 ≤ r < counts[g]);
          flips bool (P*K, 2): left-right, up-down (all False when flips are off).
        """
        epoch, b = divmod(t, self.batches_per_epoch)
        genes = self._epoch_genes(epoch)[b * self.P:(b + 1) * self.P]
        rng = np.random.default_rng([self.seed, 1, t])
        recs = []
        for g in genes:
            n = int(self.counts[g])
            recs.append(rng.permutation(np.arange(max(n, self.K)) % n)[:self.K])
        flips = (rng.random((self.P * self.K, 2)) < 0.5 if self.flips
                 else np.zeros((self.P * self.K, 2), bool))
        return np.repeat(genes, self.K), np.concatenate(recs), flips


class _RecordReader:
    """Positioned reads of single records from uncompressed shards (one fd per shard).

    `os.pread` has no file position, so concurrent reads from parallel map calls are safe.

    Every read is checked before the record is parsed. The first read of a record
    verifies its TFRecord framing (the masked CRC32C of the length and of the data,
    `framing.check_record_framing`) and keeps a zlib CRC-32 of the framed bytes; later
    reads of the same record compare with that (C speed, about 10x cheaper than the
    numpy CRC32C), so any byte changed since the verified read is still caught.

    Args:
      files: the shards.
      expected: the number of records index.json lists for each shard; a shard
        holding another number (truncated) is an error naming both counts.
    """

    def __init__(self, files: Sequence[str], expected: Sequence[int]):
        self._fds: list[int | None] = []
        self.files = list(files)
        self.offsets = [framing.checked_record_offsets(f, int(n))
                        for f, n in zip(self.files, expected, strict=True)]
        # 0: not verified yet; else 2**32 + zlib.crc32 of the verified framed record.
        self._verified = [np.zeros(len(o) - 1, np.uint64) for o in self.offsets]
        self._fds: list[int | None] = [None] * len(self.files)
        self._lock = threading.Lock()

    def where(self, file_id: int, record: int) -> str:
        """'SHARD: record N at byte B', for error messages."""
        return (f"{self.files[file_id]}: record {record} at byte "
                f"{int(self.offsets[file_id][record])}")

    def read(self, file_id: int, record: int) -> bytes:
        fd = self._fds[file_id]
        if fd is None:
            with self._lock:
                if self._fds[file_id] is None:
                    self._fds[file_id] = os.open(self.files[file_id], os.O_RDONLY)
                fd = self._fds[file_id]
        offsets = self.offsets[file_id]
        start, end = int(offsets[record]), int(offsets[record + 1])
        name = self.files[file_id]
        seen = int(self._verified[file_id][record])
        if seen:
            raw = os.pread(fd, end - start, start)
            if zlib.crc32(raw) == seen - (1 << 32):
                return raw[12:-4]
        raw = os.pread(fd, end - start, start)
        if len(raw) != end - start:
            raise RecordsError(f"{name}: record {record} at byte {start}: read {len(raw)} "
                               f"of {end - start} bytes (truncated shard?)")
        data = framing.check_record_framing(raw, name, record, start)
        self._verified[file_id][record] = (1 << 32) + zlib.crc32(raw)
        return data

    def close(self) -> None:
        for fd in self._fds:
            if fd is not None:
                os.close(fd)
        self._fds = [None] * len(self.files)

    def __del__(self) -> None:
        self.close()


def pk_dataset(records_dir: str, split: str = "train", *, P: int, K: int, flips: bool = True,
               standardize: bool = False, seed: int = 0, deterministic: bool = True,
               input_context: tf.distribute.InputContext | None = None,
               start_batch: int = 0, patch_size: int | None = None,
               input_spec: InputSpec | None = None) -> tf.data.Dataset:
    """Infinite P×K batches: P distinct identities (genes), K records of each, labels =
    the identity index (`records.IDENTITY_INDEX_KEY`, from the index's vocabulary).

    Records are decoded per the set's input kind: images (flipped when `flips`),
    or vectors (never flipped).

    Batch t is drawn by `PKSampler` (seeded numpy, a pure function of (seed, t); see
    its docstring for the with/without-replacement rules). A `Dataset.counter` of
    batch numbers is mapped, in parallel, through a `numpy_function` that reads just
    the chosen records with positioned reads (shards must be uncompressed), then
    decoded, flipped and standardised in TensorFlow. The iterator's only state is the
    counter, so it can be checkpointed (`tf.train.Checkpoint(data=iterator)`) and
    restored exactly; `start_batch` does the same without a checkpoint.

    Distribution. Without `input_context` each element is the GLOBAL batch
    (P*K records, the K records of a gene adjacent, genes in draw order); use it with
    `strategy.experimental_distribute_dataset`, which splits it into contiguous
    per-replica slices. With `input_context` (from
    `strategy.distribute_datasets_from_function`), the global batch is cut into
    `num_replicas_in_sync` slices of P/num_replicas genes (P must divide), and input
    pipeline i yields, in order, the slices of the replicas it feeds
    (`i*r .. (i+1)*r - 1`, r = replicas per pipeline), one slice per element, reading
    only their records. Either way, concatenating the replicas' batches of one step
    (e.g. `all_gather`) gives exactly the single-replica global batch, with the same
    flips, so multi-replica and single-replica runs can be compared exactly.

    Args:
      records_dir: directory written by `bin/extract` (uncompressed shards).
      split: split to read.
      P: genes per global batch.
      K: patches per gene.
      flips: random left-right and up-down flips.
      standardize: per-image standardisation instead of [0, 255].
      seed: seed of all draws.
      deterministic: keep batch order fixed (parallel decoding otherwise may reorder
        whole batches; the content of a batch never mixes).
      input_context: see above.
      start_batch: first global batch to yield (resume a run exactly at step t).
      patch_size: R (default: from the index).
      input_spec: what the records hold (default: from the index).

    Returns:
      Dataset of `(images float32 (b, H, W, C), labels int32 (b,))` ((b, R, R, 3) for
      ISH patches, `(vectors float32 (b, D), labels)` for a vector set) with b = P*K,
      or b = P*K/num_replicas_in_sync with `input_context`.

    Every record read is checked before it is parsed: its TFRecord framing (masked
    CRC32C of the length and of the data) on its first read, a zlib CRC-32 of the
    verified bytes on later reads (see `_RecordReader`); a failure names the shard, the
    record and its byte offset (`describe_input_error` gives it back from the
    TensorFlow error).

    Raises:
      RecordsError: no shards, no records, GZIP shards, a shard holding another number
        of records than index.json lists, P larger than the number of identities
        with records.
      ValueError: P not divisible by the replicas.
    """
    extents = shards.gene_extents(records_dir, split)
    what = identity_name(records_dir)
    if not extents:
        raise no_records_error(records_dir, split)
    if P > len(extents):
        raise RecordsError(
            f"{records_dir}: split '{split}': P={P} {what}s per batch but the split has "
            f"only {len(extents)} {what}s with records; lower P or extract more {what}s")
    files = sorted({e.file for e in extents})
    if _compression(files) is not None:
        raise RecordsError(f"{records_dir}: split '{split}' has GZIP shards; the P×K reader "
                           "needs random access to records: extract with --compression=none")
    patch_size = patch_size or _patch_size(records_dir)
    spec = _input_spec(records_dir, patch_size, input_spec)
    flips = flips and spec.kind == "image"
    file_id = {f: i for i, f in enumerate(files)}
    counts = np.array([e.count for e in extents], np.int64)
    starts = np.array([e.offset for e in extents], np.int64)
    gene_file = np.array([file_id[e.file] for e in extents], np.int64)
    labels = np.array([e.gene_index for e in extents], np.int32)
    sampler = PKSampler(counts, P, K, seed, flips)

    n_rep, first, per_pipe = 1, 0, 1
    if input_context is not None:
        n_rep = input_context.num_replicas_in_sync
        n_pipe = input_context.num_input_pipelines
        if P % n_rep:
            raise ValueError(f"P={P} genes must divide over {n_rep} replicas")
        if n_rep % n_pipe:
            raise ValueError(f"{n_rep} replicas do not divide over {n_pipe} input pipelines")
        per_pipe = n_rep // n_pipe
        first = input_context.input_pipeline_id * per_pipe
    b = P * K // n_rep

    sampler_files = _RecordReader(files, index_record_counts(records_dir, split, files))
    for e in extents:
        held = len(sampler_files.offsets[file_id[e.file]]) - 1
        if e.offset + e.count > held:
            raise RecordsError(
                f"{e.file}: {shards.INDEX_NAME} says {what} '{e.gene_symbol}' has records "
                f"{e.offset}..{e.offset + e.count - 1}, the shard holds {held} (index out of "
                "date, or a truncated shard: extract it again)")

    def read_slice(t: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, ...]:
        # A pure function of (t, r): the iterator's only state is the counter, so
        # it can be checkpointed (see the external-state policy below).
        genes, recs, bits = sampler.batch(int(t))
        sl = slice(int(r) * b, (int(r) + 1) * b)
        at = [(int(gene_file[g]), int(starts[g] + i))
              for g, i in zip(genes[sl], recs[sl], strict=True)]
        serialized = np.array([sampler_files.read(f, i) for f, i in at], dtype=object)
        where = np.array([sampler_files.where(f, i).encode() for f, i in at], dtype=object)
        return serialized, labels[genes[sl]], bits[sl], where

    def load(t, r):
        serialized, label, bits, where = tf.numpy_function(
            read_slice, [t, r], [tf.string, tf.int32, tf.bool, tf.string], stateful=False)
        serialized.set_shape([b])
        label.set_shape([b])
        bits.set_shape([b, 2])
        where.set_shape([b])
        # The slice as a batch: one parse, one check, per-record decoding inside this
        # call, one flip-and-cast.
        payload, _ = _decode_records(serialized, spec, lambda i: where[i])
        return _prepare_batch(payload, spec, bits if flips else None, standardize), label

    # Element = (global batch t, replica slice r) for the replicas this pipeline feeds.
    ds = tf.data.Dataset.counter(start_batch, dtype=tf.int64).flat_map(
        lambda t: tf.data.Dataset.range(first, first + per_pipe).map(lambda r: (t, r)))
    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    options = _options(deterministic)
    # The numpy_function reads files but keeps no state between calls, so saving the
    # iterator (bin/train --checkpoint_data) may ignore it and just save the counter.
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    return ds.prefetch(AUTOTUNE).with_options(options)

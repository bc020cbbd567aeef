"""Shards of a record set: the sharded writer, the index and the splits.

The record schema (feature keys, `make_example`, parsing, decoding) is
`ish_tf.data.records`; this module writes and finds those records; the framing of one
record (offsets, CRC32C, positioned reads) is `ish_tf.data.framing`.

Layout of an output directory `OUT` written by `bin/extract`::

    OUT/train-00000-of-00004.tfrecord[.gz]   # shards, named by `shard_name`
    OUT/train-00000-of-00004.tfrecord.offsets.npy  # byte offset of each record
                                             # (uncompressed shards only)
    OUT/index.json                           # every completed shard + dataset info
    OUT/genes.csv                            # gene vocabulary with counts

Within a split, whole genes go to one shard (genes sorted, assigned round-robin by
`assign_shards`) and inside a shard the records of a gene are contiguous (then
ordered by image, then patch). Two things follow: a shard is the unit of resume
(it is redone whole, never appended to), and a gene's records are found by
(shard file, offset, count) from the index, which the P×K reader
(`ish_tf.data.pipeline.pk_dataset`) uses to read one gene without scanning others.

The index is the source of truth: a shard is complete only once its `ShardInfo` is
in `index.json`. Shards are written under a temporary name and renamed on clean
close, and the index is rewritten atomically under a file lock, so a crash at any
point leaves an index that agrees with the files on disk (at worst, one finished
shard that the index does not list yet; a rerun rewrites it).

TensorFlow is imported lazily so that reading the index or splitting genes does not
pay for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np

from ish_tf import fs
from ish_tf.data.framing import FRAMING_BYTES, write_offsets
from ish_tf.data.inputs import InputSpec
from ish_tf.data.records import (
    DEFAULT_GROUP_NAME,
    DEFAULT_IDENTITY_NAME,
    RecordsError,
    input_spec_of,
)
from ish_tf.io_utils import atomic_write_text, tmp_path_for

INDEX_NAME = "index.json"
GENES_NAME = "genes.csv"
INDEX_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "validation", "test")
COMPRESSIONS: tuple[str | None, ...] = (None, "GZIP")


# --------------------------------------------------------------------------- shards
def _check_compression(compression: str | None) -> str | None:
    if compression in (None, "", "NONE", "none"):
        return None
    if str(compression).upper() == "GZIP":
        return "GZIP"
    raise RecordsError(f"compression must be None or 'GZIP', got {compression!r}")


def shard_name(split: str, index: int, num_shards: int, compression: str | None = None) -> str:
    """File name of one shard, e.g. `train-00003-of-00016.tfrecord` (+ `.gz` for GZIP).

    Raises:
      RecordsError: index out of range or an unknown compression.
    """
    if not 0 <= index < num_shards:
        raise RecordsError(f"shard index {index} out of range for {num_shards} shards")
    name = f"{split}-{index:05d}-of-{num_shards:05d}.tfrecord"
    return name + ".gz" if _check_compression(compression) == "GZIP" else name


def compression_of(path: str) -> str | None:
    """The compression of a shard file, read from its name (`.gz` -> GZIP)."""
    return "GZIP" if path.endswith(".gz") else None


def assign_shards(gene_symbols: Iterable[str], num_shards: int) -> dict[str, int]:
    """Assigns whole genes to shards: genes sorted, then round-robin.

    Args:
      gene_symbols: the genes of one split (duplicates are ignored).
      num_shards: number of shards of the split, ≥ 1.

    Returns:
      gene_symbol -> shard index.
    """
    if num_shards < 1:
        raise RecordsError(f"num_shards must be >= 1, got {num_shards}")
    return {g: i % num_shards for i, g in enumerate(sorted(set(gene_symbols)))}


@dataclasses.dataclass
class ShardInfo:
    """What one completed shard holds.

    Attributes:
      file: shard file name, relative to the records directory.
      split: train | validation | test.
      index, num_shards: position of the shard in its split.
      num_records: records (patches) in the shard.
      num_images: distinct image ids in the shard.
      genes: gene_symbol -> number of records.
      compression: None or "GZIP".
      gene_offsets: gene_symbol -> position of the gene's first record in the shard
        (its records are the `genes[g]` records from there on).
      gene_images: gene_symbol -> distinct images of the gene in the shard.
    """

    file: str
    split: str
    index: int
    num_shards: int
    num_records: int = 0
    num_images: int = 0
    genes: dict[str, int] = dataclasses.field(default_factory=dict)
    compression: str | None = None
    gene_offsets: dict[str, int] = dataclasses.field(default_factory=dict)
    gene_images: dict[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> ShardInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class ShardWriter:
    """Writes one shard under a temporary name; renames it into place on clean close.

    Records of one gene must be written contiguously (all of gene A, then all of B);
    a gene that reappears after another raises, because readers rely on
    (offset, count) per gene.

    Usage::

        with ShardWriter(out, "train", 3, 16) as w:
            for ...: w.write(make_example(...), gene_symbol, image_id)
        update_index(out, w.info)   # the shard counts as done only now

    On an exception inside the `with` block (or `abort()`), the temporary file is
    removed and nothing with the final name is created.

    Args:
      out_dir: records directory (created if missing).
      split: split name (goes into the file name).
      index, num_shards: shard position.
      compression: None or "GZIP".
    """

    def __init__(self, out_dir: str, split: str, index: int, num_shards: int,
                 compression: str | None = None):
        import tensorflow as tf

        self.compression = _check_compression(compression)
        self.out_dir, self.split = out_dir, split
        self.index, self.num_shards = index, num_shards
        fs.makedirs(out_dir)
        self.path = fs.join(out_dir, shard_name(split, index, num_shards, self.compression))
        self._tmp = tmp_path_for(self.path)
        options = tf.io.TFRecordOptions(compression_type=self.compression or "")
        self._writer = tf.io.TFRecordWriter(self._tmp, options=options)
        self._genes: dict[str, int] = {}
        self._offsets: dict[str, int] = {}
        self._gene_images: dict[str, set[int]] = {}
        self._images: set[int] = set()
        self._current: str | None = None
        self._n = 0
        # Framing start of every record (uncompressed shards), for the offsets sidecar.
        self._offsets_bytes: list[int] = [0]
        self.info: ShardInfo | None = None

    def write(self, serialized: bytes, gene_symbol: str, image_id: int) -> None:
        """Appends one serialized record.

        Args:
          serialized: output of `make_example`.
          gene_symbol, image_id: the record's gene and image (for the shard's counts).

        Raises:
          RecordsError: the writer is closed, or the gene's records are not contiguous.
        """
        if self.info is not None or self._writer is None:
            raise RecordsError(f"{self.path}: write after close")
        if gene_symbol != self._current:
            if gene_symbol in self._genes:
                raise RecordsError(
                    f"{self.path}: records of gene '{gene_symbol}' are not contiguous "
                    f"(it reappears after '{self._current}'); write each gene's records together")
            self._current = gene_symbol
            self._offsets[gene_symbol] = self._n
            self._genes[gene_symbol] = 0
            self._gene_images[gene_symbol] = set()
        self._writer.write(serialized)
        self._offsets_bytes.append(self._offsets_bytes[-1] + FRAMING_BYTES + len(serialized))
        self._genes[gene_symbol] += 1
        self._gene_images[gene_symbol].add(int(image_id))
        self._images.add(int(image_id))
        self._n += 1

    def close(self) -> ShardInfo:
        """Finishes the shard: flushes, renames to the final name, returns its `ShardInfo`.

        Idempotent: a second call returns the same info.
        """
        if self.info is not None:
            return self.info
        if self._writer is None:
            raise RecordsError(f"{self.path}: close after abort")
        try:
            self._writer.close()
            self._writer = None
            if self.compression is None:
                # Sidecar first: a shard never exists without its offsets (a stale sidecar
                # without a shard is harmless: it is checked against the shard's size).
                write_offsets(self.path, np.asarray(self._offsets_bytes, np.int64))
            fs.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.info = ShardInfo(
            file=fs.basename(self.path), split=self.split, index=self.index,
            num_shards=self.num_shards, num_records=self._n, num_images=len(self._images),
            genes=dict(self._genes), compression=self.compression,
            gene_offsets=dict(self._offsets),
            gene_images={g: len(s) for g, s in self._gene_images.items()})
        return self.info

    def abort(self) -> None:
        """Discards the shard: closes the writer and removes the temporary file."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        fs.remove(self._tmp)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()


# --------------------------------------------------------------------------- index
@dataclasses.dataclass
class GeneEntry:
    """One gene of the dataset's vocabulary; `gene_index` is the triplet label."""

    gene_symbol: str
    gene_index: int
    entrez_id: int = -1
    split: str = ""


@dataclasses.dataclass
class DatasetInfo:
    """Dataset-level facts stored in `index.json` beside the shards.

    Attributes:
      genes: the gene vocabulary (gene_index is the position in the label space).
      donors: donor names; a donor's donor_index is its position in this list.
      source_size: S, the side of the source window in original-image pixels.
      patch_size: R, the side of the stored patch.
      format: "jpeg" or "png"; "raw" for raw images, "vector" for vector sets.
      seed: seed of the extraction (splits, sampling).
      split_by: "gene" or "donor".
      donor_splits: donor -> split when split_by == "donor".
      extra: free-form facts of the extraction (flags, source manifest, ...).
      input_spec: the set's input kind (`InputSpec.to_dict()`); None for sets written
        before kinds were recorded, which hold 3-channel images of `patch_size`
        (see `input_spec()`).
      identity_name: what the records' identities are ("gene", "perturbation", ...):
        `genes` is the identity vocabulary, whatever the name.
      group_name: what the records' groups are ("donor", "plate", "batch", ...):
        `donors` is the group list, whatever the name.
    """

    genes: list[GeneEntry]
    donors: list[str] = dataclasses.field(default_factory=list)
    source_size: int = 0
    patch_size: int = 0
    format: str = "jpeg"
    seed: int = 0
    split_by: str = "gene"
    donor_splits: dict[str, str] = dataclasses.field(default_factory=dict)
    extra: dict = dataclasses.field(default_factory=dict)
    input_spec: dict | None = None
    identity_name: str = DEFAULT_IDENTITY_NAME
    group_name: str = DEFAULT_GROUP_NAME

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def spec(self) -> InputSpec:
        """The set's `InputSpec` (3-channel images of `patch_size` when none is stored)."""
        return input_spec_of(self.to_dict())

    @classmethod
    def from_dict(cls, d: Mapping) -> DatasetInfo:
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["genes"] = [GeneEntry(**g) for g in d.get("genes", [])]
        return cls(**kw)

    def gene_index(self) -> dict[str, int]:
        """gene_symbol -> gene_index."""
        return {g.gene_symbol: g.gene_index for g in self.genes}


def make_gene_vocabulary(gene_symbols: Iterable[str], splits: Mapping[str, str] | None = None,
                         entrez_ids: Mapping[str, int] | None = None) -> list[GeneEntry]:
    """Gene vocabulary: genes sorted by symbol, gene_index = rank (deterministic).

    Args:
      gene_symbols: genes of the dataset (duplicates ignored).
      splits: gene -> split (e.g. from `split_genes`), optional.
      entrez_ids: gene -> Entrez id, optional (missing/NaN -> -1).
    """
    out = []
    for i, g in enumerate(sorted(set(gene_symbols))):
        eid = (entrez_ids or {}).get(g, -1)
        eid = -1 if eid is None or (isinstance(eid, float) and np.isnan(eid)) else int(eid)
        out.append(GeneEntry(g, i, eid, (splits or {}).get(g, "")))
    return out


def index_path(out_dir: str) -> str:
    return fs.join(out_dir, INDEX_NAME)


def _empty_index() -> dict:
    return {"version": INDEX_VERSION, "dataset": None, "shards": []}


def load_index(out_dir: str, missing_ok: bool = False) -> dict:
    """Reads `OUT/index.json`.

    Args:
      out_dir: records directory.
      missing_ok: return an empty index instead of raising when there is none.

    Returns:
      {"version": 1, "dataset": DatasetInfo dict or None, "shards": [ShardInfo dicts]}.

    Raises:
      RecordsError: the index is missing (unless missing_ok) or unreadable.
    """
    path = index_path(out_dir)
    if not fs.exists(path):
        if missing_ok:
            return _empty_index()
        raise RecordsError(f"{out_dir}: no {INDEX_NAME}; is this a records directory "
                           f"written by bin/extract (did it finish any shard)?")
    try:
        with fs.open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RecordsError(f"{path}: cannot read the index: {e}") from e
    if not isinstance(index, dict) or "shards" not in index:
        raise RecordsError(f"{path}: not an ish_tf records index (no 'shards' key)")
    index.setdefault("dataset", None)
    return index


@contextlib.contextmanager
def _locked(out_dir: str) -> Iterator[None]:
    """Serialises read-modify-write of the index between processes (parallel extract).

    On a URL (`ish_tf.fs`) there is no file lock to take: there only one process, the
    Beam driver, writes the index (workers write shards and their own result files).
    """
    if fs.is_url(out_dir):
        fs.makedirs(out_dir)
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, INDEX_LOCK_NAME), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


INDEX_LOCK_NAME = ".index.lock"


def remove_index_lock(out_dir: str) -> None:
    """Removes OUT/.index.lock once a run's writers are done (no file left behind).

    Only for the end of a run, when no other process of it updates the index: a lock
    file removed while a writer waits on it would let two writers in at once.
    """
    fs.remove(fs.join(out_dir, INDEX_LOCK_NAME))


def _write_index(out_dir: str, index: dict) -> None:
    index["shards"] = sorted(index["shards"], key=lambda s: (s["split"], s["index"]))
    atomic_write_text(index_path(out_dir), json.dumps(index, indent=1, sort_keys=True) + "\n")
    if index.get("dataset"):
        write_genes_csv(out_dir, index)


def update_index(out_dir: str, shard_info: ShardInfo) -> dict:
    """Adds (or replaces) one completed shard in the index, atomically.

    Call it after `ShardWriter.close()`; the shard counts as complete only from now.

    Args:
      out_dir: records directory.
      shard_info: the shard's info.

    Returns:
      The updated index.

    Raises:
      RecordsError: the shard file is absent, or the split already has shards with
        a different `num_shards` (a rerun with another shard count must use a fresh
        directory, otherwise old and new shards would double-count genes).
    """
    if not fs.exists(fs.join(out_dir, shard_info.file)):
        raise RecordsError(f"{out_dir}: shard {shard_info.file} is not on disk; "
                           "call update_index only after ShardWriter.close()")
    with _locked(out_dir):
        index = load_index(out_dir, missing_ok=True)
        kept = []
        for s in index["shards"]:
            if s["split"] != shard_info.split:
                kept.append(s)
                continue
            if s["num_shards"] != shard_info.num_shards:
                raise RecordsError(
                    f"{index_path(out_dir)}: split '{shard_info.split}' already has shards "
                    f"of {s['num_shards']}, this one is of {shard_info.num_shards}; "
                    "use a fresh output directory to change the number of shards")
            if s["index"] != shard_info.index:
                kept.append(s)
        kept.append(shard_info.to_dict())
        index["shards"] = kept
        _write_index(out_dir, index)
    return index


def write_dataset_info(out_dir: str, info: DatasetInfo) -> dict:
    """Stores the dataset-level info in the index (atomically) and rewrites genes.csv.

    Args:
      out_dir: records directory.
      info: dataset info; replaces any stored one.

    Returns:
      The updated index.
    """
    with _locked(out_dir):
        index = load_index(out_dir, missing_ok=True)
        index["dataset"] = info.to_dict()
        _write_index(out_dir, index)
    return index


def load_dataset_info(out_dir: str) -> DatasetInfo | None:
    """The stored `DatasetInfo`, or None when the directory has none yet."""
    d = load_index(out_dir, missing_ok=True).get("dataset")
    return DatasetInfo.from_dict(d) if d else None


def records_input_spec(records_dir: str) -> InputSpec:
    """The input kind of a record set, from its index.

    Sets written before input kinds were recorded (no `input_spec` in the dataset
    info, or no dataset info at all) hold 3-channel uint8 images of the patch size R:
    `InputSpec.image(3, R, R)`.

    Raises:
      RecordsError: no index, or an invalid stored spec.
    """
    return input_spec_of(load_index(records_dir).get("dataset"))


def completed_shards(out_dir: str, split: str) -> set[int]:
    """Indices of the shards of `split` that the index lists and that exist on disk."""
    index = load_index(out_dir, missing_ok=True)
    return {s["index"] for s in index["shards"]
            if s["split"] == split and fs.exists(fs.join(out_dir, s["file"]))}


def shard_infos(out_dir: str, split: str) -> list[ShardInfo]:
    """Completed shards of a split, in index order, from the index."""
    index = load_index(out_dir)
    return [ShardInfo.from_dict(s) for s in index["shards"] if s["split"] == split]


def write_genes_csv(out_dir: str, index: dict | None = None) -> str:
    """Writes `OUT/genes.csv` (gene_symbol, gene_index, entrez_id, split, n_images, n_patches).

    Counts cover completed shards only. Genes of the vocabulary with no completed
    shard yet have zero counts.

    Returns:
      The path written.

    Raises:
      RecordsError: the index has no dataset info.
    """
    index = index or load_index(out_dir)
    if not index.get("dataset"):
        raise RecordsError(f"{index_path(out_dir)}: no dataset info; call write_dataset_info")
    info = DatasetInfo.from_dict(index["dataset"])
    n_patches: dict[str, int] = {}
    n_images: dict[str, int] = {}
    for s in index["shards"]:
        for g, n in s["genes"].items():
            n_patches[g] = n_patches.get(g, 0) + n
        for g, n in s.get("gene_images", {}).items():
            n_images[g] = n_images.get(g, 0) + n
    lines = ["gene_symbol,gene_index,entrez_id,split,n_images,n_patches"]
    for g in sorted(info.genes, key=lambda e: e.gene_index):
        lines.append(f"{_csv(g.gene_symbol)},{g.gene_index},{g.entrez_id},{g.split},"
                     f"{n_images.get(g.gene_symbol, 0)},{n_patches.get(g.gene_symbol, 0)}")
    path = fs.join(out_dir, GENES_NAME)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _csv(s: str) -> str:
    return f'"{s.replace(chr(34), chr(34) * 2)}"' if any(c in s for c in ',"\n') else s


@dataclasses.dataclass(frozen=True)
class GeneExtent:
    """Where one gene's records lie: `count` records from `offset` in `file`."""

    gene_symbol: str
    gene_index: int
    file: str
    offset: int
    count: int


def gene_extents(out_dir: str, split: str) -> list[GeneExtent]:
    """Every gene of a split with the location of its records, sorted by gene symbol.

    Args:
      out_dir: records directory.
      split: split name.

    Returns:
      One `GeneExtent` per gene (absolute file paths); genes with no records are left out.

    Raises:
      RecordsError: the split has no completed shard, unlabelled records (an empty
        identity, e.g. RxRx1 test wells), or a gene is missing from the vocabulary.
    """
    index = load_index(out_dir)
    shards = [s for s in index["shards"] if s["split"] == split]
    if not shards:
        raise RecordsError(f"{out_dir}: split '{split}' has no completed shards in {INDEX_NAME}")
    vocab = DatasetInfo.from_dict(index["dataset"]).gene_index() if index.get("dataset") else {}
    out = []
    for s in shards:
        offsets = s.get("gene_offsets") or {}
        for g, n in s["genes"].items():
            if n <= 0:
                continue
            if g == "":
                identity = (index.get("dataset") or {}).get("identity_name") or "gene"
                raise RecordsError(
                    f"{out_dir}: split '{split}': shard {s['file']} holds {n} unlabelled "
                    f"records (no {identity}); grouping by {identity} (P×K batches) needs "
                    "labelled records: train P×K on a labelled split, or read this one with "
                    "the plain reader (patch_dataset)")
            if g not in vocab:
                raise RecordsError(f"{index_path(out_dir)}: gene '{g}' of shard {s['file']} "
                                   "is not in the dataset's gene vocabulary")
            if g not in offsets:
                raise RecordsError(f"{index_path(out_dir)}: shard {s['file']} has no offset "
                                   f"for gene '{g}'")
            out.append(GeneExtent(g, vocab[g], os.path.join(out_dir, s["file"]),
                                  int(offsets[g]), int(n)))
    return sorted(out, key=lambda e: e.gene_symbol)


# --------------------------------------------------------------------------- splits
def _split_items(items: Iterable[str], fractions: Sequence[float], seed: int,
                 what: str) -> dict[str, str]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise RecordsError(f"split fractions must be three non-negative numbers "
                           f"(train, validation, test), got {tuple(fractions)}")
    uniq = sorted(set(items))
    if not uniq:
        raise RecordsError(f"cannot split an empty list of {what}s")
    total = float(sum(fractions))
    fr = [f / total for f in fractions]
    n = len(uniq)
    nonzero = [i for i in range(3) if fr[i] > 0]
    counts = [0, 0, 0]
    if n < len(nonzero):
        # Too few items for every split: one each, train first, then validation.
        for i in nonzero[:n]:
            counts[i] = 1
    else:
        # Largest-remainder apportionment (ties: train, then validation), so counts sum
        # to n and are as close as possible to the fractions; then every split with a
        # non-zero fraction gets at least one item, taken from the largest split.
        quotas = [n * f for f in fr]
        counts = [int(np.floor(q)) for q in quotas]
        for i in sorted(range(3), key=lambda i: (-(quotas[i] - counts[i]), i))[:n - sum(counts)]:
            counts[i] += 1
        for i in nonzero:
            if counts[i] == 0:
                counts[max(range(3), key=lambda j: (counts[j], -j))] -= 1
                counts[i] = 1
    n_train, n_val, n_test = counts
    # Seeded permutation of the sorted list: independent of input order and of PYTHONHASHSEED.
    order = np.random.default_rng(seed).permutation(n)
    out = {}
    for rank, i in enumerate(order):
        if rank < n_train:
            out[uniq[i]] = "train"
        elif rank < n_train + n_val:
            out[uniq[i]] = "validation"
        else:
            out[uniq[i]] = "test"
    return out


def split_genes(gene_symbols: Iterable[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> dict[str, str]:
    """Assigns each gene to train, validation or test (deterministic given the seed).

    Args:
      gene_symbols: genes (duplicates ignored; order does not matter).
      fractions: (train, validation, test) proportions, normalised to sum 1.
      seed: seed of the permutation.

    Returns:
      gene -> "train" | "validation" | "test". With ≥ 3 genes every split whose
      fraction is > 0 is non-empty.

    Raises:
      RecordsError: bad fractions or no genes.
    """
    return _split_items(gene_symbols, fractions, seed, "gene")


def split_donors(donor_ids: Iterable[str], fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> dict[str, str]:
    """Assigns each donor to a split, for `--split_by=donor`; same rules as `split_genes`."""
    return _split_items(donor_ids, fractions, seed, "donor")

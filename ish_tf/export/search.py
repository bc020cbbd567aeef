"""Nearest-gene search inside a SavedModel: `bin/export --search_index=TABLE`.

An export made with a search index gets two more signatures that run in stock TF
Serving (no custom ops, no ish_tf code on the server):

* `search`: the export's serving input (`image_bytes` tf.string (B,) JPEG/PNG for
  ISH patches; `images` or `vectors` for other input kinds) and `k` int32 scalar ->
  the model's embedding, then an exact top-k over the stored vectors;
* `search_embedding`: `embedding` float32 (B, D) and `k` -> the same top-k (for
  embeddings computed elsewhere).

Both return `genes` tf.string (B, k) (the gene of each hit), `ids` tf.string (B, k)
(the hit's row key: the gene for a gene-level index, the image id for an image-level
one, "gene|donor" for a donor-level one), `distances` float32 (B, k) ascending,
`indices` int32 (B, k) (rows of the index table) and `embedding` float32 (B, D). `k`
larger than the index is clipped to its size; k < 1 is an error.

The index is an embedding table `bin/embed` wrote (gene_embeddings.csv, or
image/donor_embeddings.csv): its vectors are stored as they are, as non-trainable
variables of the SavedModel. The distance is the training metric of the model (the
triplet family's `metric` in RUN/model_config.json: euclidean, sqeuclidean or
cityblock) unless one is given; cosine is also offered. Distances are computed in
float32 like `ish_tf.evaluate.reid`: euclidean/sqeuclidean as
|q - m|² - 2 (q - m)·(c - m) + |c - m|² with m the index mean (translation changes no
distance and the centring limits cancellation), cosine as 1 - cos. Ties go to the
lower index row (`tf.math.top_k`'s order, and `np.argmin`'s in the reid code).

ScaNN's TF ops do not load beside TF 2.21 and tensorflow-recommenders needs legacy
Keras; an exact search is one matrix product per query batch and is fast enough for
the ~20,000 genes of a genome (bench/bench_search.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

SEARCH_SIGNATURE = "search"
SEARCH_EMBEDDING_SIGNATURE = "search_embedding"
K_INPUT = "k"
EMBEDDING_INPUT = "embedding"
SEARCH_OUTPUTS = ("genes", "ids", "distances", "indices", "embedding")
SEARCH_METRICS = ("euclidean", "sqeuclidean", "cityblock", "cosine")
DEFAULT_METRIC = "euclidean"
# Key columns that make up a row's id, by level (finest first).
_ID_COLUMNS = (("patch", ("image_id", "patch_index")), ("image", ("image_id",)),
               ("donor", ("gene_symbol", "donor_id")), ("gene", ("gene_symbol",)))


class SearchIndexError(ValueError):
    """A search index that cannot be built; the message names the file and column."""


@dataclasses.dataclass
class SearchIndex:
    """Stored vectors and their labels.

    Attributes:
      values: (N, D) float32 vectors.
      genes: (N,) gene of each row (str).
      ids: (N,) row key (str): gene, "gene|donor", image id or "image|patch".
      metric: one of SEARCH_METRICS.
      level: gene, donor, image or patch.
      source: the table it was read from.
    """

    values: np.ndarray
    genes: np.ndarray
    ids: np.ndarray
    metric: str = DEFAULT_METRIC
    level: str = "gene"
    source: str = ""

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float32)
        self.genes = np.asarray(self.genes).astype(str)
        self.ids = np.asarray(self.ids).astype(str)
        if self.metric not in SEARCH_METRICS:
            raise SearchIndexError(f"search metric must be one of {', '.join(SEARCH_METRICS)}, "
                                   f"got {self.metric!r}")
        if self.values.ndim != 2 or len(self.values) < 1:
            raise SearchIndexError(f"{self.source or 'search index'}: expected a non-empty "
                                   f"(N, D) table, got shape {self.values.shape}")
        n = len(self.values)
        if self.genes.shape != (n,) or self.ids.shape != (n,):
            raise SearchIndexError(f"{self.source or 'search index'}: {n} vectors but "
                                   f"{self.genes.shape} genes and {self.ids.shape} ids")

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def describe(self) -> dict[str, Any]:
        """JSON facts for the export's sidecar."""
        return {"source": self.source, "level": self.level, "metric": self.metric,
                "size": len(self), "dim": self.dim}


def training_metric(model_config: Mapping[str, Any] | None) -> str:
    """The distance a model was trained with, from RUN/model_config.json's content.

    The triplet family records it as `config.family.metric`; families without one
    (and unknown layouts) get euclidean.
    """
    family = ((model_config or {}).get("config") or {}).get("family") or {}
    metric = family.get("metric") if isinstance(family, Mapping) else None
    return str(metric) if metric in SEARCH_METRICS else DEFAULT_METRIC


def index_from_table(table, metric: str = DEFAULT_METRIC) -> SearchIndex:
    """A `SearchIndex` from an `ish_tf.data.embeddings.EmbeddingTable`.

    The level is the finest whose key columns the table has (patch, image, donor, gene).

    Raises:
      SearchIndexError: no gene_symbol column, or a gene-level table repeating a gene.
    """
    from ish_tf.data.embeddings import describe_duplicates, duplicate_genes

    keys = table.keys
    source = table.source or "<table>"
    if "gene_symbol" not in keys.columns:
        raise SearchIndexError(f"{source}: a search index needs column 'gene_symbol' (the "
                               f"names a search returns); its key columns are "
                               f"{', '.join(map(str, keys.columns)) or 'none'}")
    level, cols = next((lv, c) for lv, c in _ID_COLUMNS
                       if all(x in keys.columns for x in c))
    missing = keys["gene_symbol"].isna()
    if missing.any():
        i = int(np.flatnonzero(missing.to_numpy())[0])
        raise SearchIndexError(f"{source}: column 'gene_symbol' is empty at data row {i + 1} "
                               f"(line {i + 2} of a CSV)")
    if level == "gene":
        dups = duplicate_genes(table)
        if dups:
            raise SearchIndexError(f"{source}: a gene-level search index names each gene once; "
                                   f"{describe_duplicates(table, dups)}")
    ids = keys[list(cols)].astype(str).agg("|".join, axis=1).to_numpy()
    return SearchIndex(table.values, keys["gene_symbol"].astype(str).to_numpy(), ids,
                       metric=metric, level=level, source=source)


def read_search_index(path: str, metric: str = DEFAULT_METRIC) -> SearchIndex:
    """Reads an embedding table (CSV/Parquet, `ish_tf.data.embeddings`) as a search index.

    Raises:
      ish_tf.data.embeddings.EmbeddingTableError, SearchIndexError: naming the file.
    """
    from ish_tf.data.embeddings import read_embedding_table

    return index_from_table(read_embedding_table(path, require=("gene_symbol",)), metric)


# --------------------------------------------------------------------------- numpy reference
def numpy_search(queries: np.ndarray, values: np.ndarray, k: int,
                 metric: str = DEFAULT_METRIC) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k in numpy (float64): the baseline of the benchmark and the tests.

    Returns:
      (distances (B, k), indices (B, k)), ascending, ties to the lower index.
    """
    q = np.asarray(queries, dtype=np.float64)
    c = np.asarray(values, dtype=np.float64)
    if metric in ("euclidean", "sqeuclidean"):
        d = np.maximum((q * q).sum(1)[:, None] - 2 * q @ c.T + (c * c).sum(1)[None, :], 0.0)
        d = np.sqrt(d) if metric == "euclidean" else d
    elif metric == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        cn = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        d = 1.0 - qn @ cn.T
    elif metric == "cityblock":
        d = np.abs(q[:, None, :] - c[None, :, :]).sum(-1)
    else:
        raise SearchIndexError(f"unknown metric {metric!r}")
    k = min(int(k), c.shape[0])
    part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < c.shape[0] else \
        np.tile(np.arange(c.shape[0]), (len(q), 1))
    # Stable sort by (distance, index) of the k candidates.
    part = np.sort(part, axis=1)
    order = np.argsort(np.take_along_axis(d, part, 1), axis=1, kind="stable")
    idx = np.take_along_axis(part, order, 1)
    return np.take_along_axis(d, idx, 1), idx


# --------------------------------------------------------------------------- graph
def _tf_module(index: SearchIndex):
    """A tf.Module holding the index as non-trainable variables (saved with the model)."""
    import tensorflow as tf

    values = index.values.astype(np.float64)
    if index.metric in ("euclidean", "sqeuclidean"):
        mean = values.mean(axis=0)
        stored = values - mean
    elif index.metric == "cosine":
        mean = np.zeros(index.dim)
        norms = np.linalg.norm(values, axis=1, keepdims=True)
        stored = values / np.where(norms > 0, norms, 1.0)
    else:
        mean = np.zeros(index.dim)
        stored = values
    module = tf.Module(name="search_index")
    module.values = tf.Variable(stored.astype(np.float32), trainable=False, name="values")
    module.sq_norms = tf.Variable((stored ** 2).sum(1).astype(np.float32), trainable=False,
                                  name="sq_norms")
    module.mean = tf.Variable(mean.astype(np.float32), trainable=False, name="mean")
    module.genes = tf.Variable(tf.constant(index.genes.tolist(), tf.string), trainable=False,
                               name="genes")
    module.ids = tf.Variable(tf.constant(index.ids.tolist(), tf.string), trainable=False,
                             name="ids")
    return module


def _distances(module, queries, metric: str):
    """(B, N) float32 distances of queries (B, D) to the stored vectors."""
    import tensorflow as tf

    q = tf.cast(queries, tf.float32)
    if metric in ("euclidean", "sqeuclidean"):
        q = q - module.mean[None, :]
        d = (tf.reduce_sum(q * q, axis=1, keepdims=True)
             - 2.0 * tf.matmul(q, module.values, transpose_b=True) + module.sq_norms[None, :])
        d = tf.maximum(d, 0.0)
        return tf.sqrt(d) if metric == "euclidean" else d
    if metric == "cosine":
        q = tf.math.l2_normalize(q, axis=1, epsilon=1e-24)
        return 1.0 - tf.matmul(q, module.values, transpose_b=True)
    # cityblock: one query at a time, so memory stays (N, D), not (B, N, D).
    return tf.map_fn(lambda row: tf.reduce_sum(tf.abs(module.values - row[None, :]), axis=1), q,
                     fn_output_signature=tf.TensorSpec([None], tf.float32))


def _top_k(module, embedding, k, metric: str) -> dict:
    import tensorflow as tf

    k = tf.convert_to_tensor(k, tf.int32)
    n = tf.shape(module.values)[0]
    check = tf.debugging.assert_positive(k, message="search: k must be >= 1")
    with tf.control_dependencies([check]):
        k = tf.minimum(k, n)
    dist = _distances(module, embedding, metric)
    neg, idx = tf.math.top_k(-dist, k=k, sorted=True)  # ties: the lower index first
    return {"genes": tf.gather(module.genes, idx), "ids": tf.gather(module.ids, idx),
            "distances": -neg, "indices": idx, "embedding": tf.cast(embedding, tf.float32)}


def add_search_endpoints(archive, index: SearchIndex, input_signature,
                         embed: Callable) -> dict[str, Any]:
    """Adds `search` and `search_embedding` to a `keras.export.ExportArchive`.

    Args:
      archive: the archive (already tracking the model).
      index: the stored vectors; their dimension must be the model's embedding width.
      input_signature: the tf.TensorSpec of the export's serving input (image bytes,
        pixels or vectors).
      embed: serving input -> (B, D) embedding tensor (the model, in inference mode).

    Returns:
      Sidecar facts: the index description and each signature's inputs and outputs.
    """
    import tensorflow as tf

    module = _tf_module(index)
    archive.track(module)
    metric = index.metric
    k_spec = tf.TensorSpec([], tf.int32, name=K_INPUT)

    def search(inputs, k):
        return _top_k(module, embed(inputs), k, metric)

    def search_embedding(embedding, k):
        return _top_k(module, embedding, k, metric)

    archive.add_endpoint(SEARCH_SIGNATURE, search, input_signature=[input_signature, k_spec])
    archive.add_endpoint(SEARCH_EMBEDDING_SIGNATURE, search_embedding, input_signature=[
        tf.TensorSpec([None, index.dim], tf.float32, name=EMBEDDING_INPUT), k_spec])
    outputs = list(SEARCH_OUTPUTS)
    k_doc = "int32 scalar: hits per query (clipped to the index size)"
    return {
        "index": index.describe(),
        "signatures": {
            SEARCH_SIGNATURE: {"inputs": {input_signature.name: "the serving_default input",
                                          K_INPUT: k_doc}, "outputs": outputs},
            SEARCH_EMBEDDING_SIGNATURE: {"inputs": {EMBEDDING_INPUT: f"float32 (B, {index.dim})",
                                                    K_INPUT: k_doc}, "outputs": outputs},
        },
    }


def check_embedding_width(index: SearchIndex, width: int | None, source: str) -> None:
    """Raises SearchIndexError when the index vectors are not `width` wide."""
    if width is not None and width != index.dim:
        raise SearchIndexError(f"{index.source}: the search index has {index.dim} dimensions "
                               f"but {source} embeds into {width}; index a table that this "
                               "model's export wrote (bin/embed)")


# --------------------------------------------------------------------------- export hooks
def load_index_for_export(path: str, metric: str = "",
                          model_config: Mapping[str, Any] | None = None) -> SearchIndex:
    """The index `bin/export --search_index=PATH` stores; metric "" = the training metric.

    Raises:
      ish_tf.export.ExportError: an unreadable table or an unknown metric (naming them).
    """
    from ish_tf.data.embeddings import EmbeddingTableError
    from ish_tf.export.saved_model import ExportError

    if metric and metric not in SEARCH_METRICS:
        raise ExportError(f"--search_metric must be one of {', '.join(SEARCH_METRICS)}, "
                          f"got {metric!r}")
    try:
        return read_search_index(path, metric or training_metric(model_config))
    except (EmbeddingTableError, SearchIndexError) as e:
        raise ExportError(f"--search_index: {e}") from e


def add_search_endpoints_for(archive, index: SearchIndex, model, spec, names,
                             output_map) -> dict[str, Any]:
    """`add_search_endpoints` for an export of `model` serving `spec` (saved_model's hook).

    The embedding searched is the model's first named output (`names[0]`).

    Raises:
      ish_tf.export.ExportError: the index width differs from that output's.
    """
    import tensorflow as tf

    from ish_tf.export import saved_model as sm
    from ish_tf.export.signatures import BYTES_INPUT, PIXELS_INPUT, VECTORS_INPUT, takes_image_bytes

    output = names[0]
    outputs = list(model.outputs) if getattr(model, "outputs", None) else []
    width = int(outputs[0].shape[-1]) if outputs and not output_map and \
        outputs[0].shape[-1] is not None else None
    try:
        check_embedding_width(index, width, f"the model's output {output!r}")
    except SearchIndexError as e:
        raise sm.ExportError(f"--search_index: {e}") from e
    if takes_image_bytes(spec):
        signature = tf.TensorSpec([None], tf.string, name=BYTES_INPUT)

        def embed(x):
            images = sm.decode_images(x, (spec.height, spec.width), spec.channels)
            return sm._name_outputs(model(images, training=False), names, output_map)[output]
    else:
        signature = (tf.TensorSpec([None, spec.dim], tf.float32, name=VECTORS_INPUT)
                     if spec.kind == "vector" else
                     tf.TensorSpec([None, spec.height, spec.width, spec.channels], tf.float32,
                                   name=PIXELS_INPUT))

        def embed(x):
            return sm._name_outputs(model(x, training=False), names, output_map)[output]

    meta = add_search_endpoints(archive, index, signature, embed)
    meta["output"] = output
    return meta


# --------------------------------------------------------------------------- querying
def query_saved_model(saved_model: str, *, images: list[str] | None = None,
                      embeddings=None, k: int = 5, batch_size: int = 64):
    """Queries an export's `search` (encoded image files) or `search_embedding` signature.

    Args:
      saved_model: an export base (newest version) or a version directory.
      images: image files (JPEG/PNG for byte exports, `.npy` arrays of the input's
        shape otherwise), queried through `search`.
      embeddings: (B, D) float32 array queried through `search_embedding` instead.
      k: hits per query.
      batch_size: queries per call.

    Returns:
      (version directory, pandas DataFrame with columns query, rank, gene, id, distance,
      index).

    Raises:
      ish_tf.export.ExportError: not an ish_tf export with a search index; a bad image.
    """
    import pandas as pd
    import tensorflow as tf

    from ish_tf.export import saved_model as sm
    from ish_tf.export.signatures import BYTES_INPUT

    path = sm.resolve_saved_model(saved_model)
    meta = sm.read_metadata(path)
    if "search" not in meta:
        raise sm.ExportError(f"{path}: exported without a search index; rerun bin/export with "
                             "--search_index=GENE_EMBEDDINGS_CSV")
    if k < 1:
        raise sm.ExportError(f"k must be >= 1, got {k}")
    loaded = tf.saved_model.load(path)
    if embeddings is not None:
        fn = loaded.signatures[SEARCH_EMBEDDING_SIGNATURE]
        queries = [f"row {i + 1}" for i in range(len(embeddings))]
        batches = [{EMBEDDING_INPUT: tf.constant(np.asarray(embeddings[i:i + batch_size],
                                                            np.float32))}
                   for i in range(0, len(embeddings), batch_size)]
    else:
        fn = loaded.signatures[SEARCH_SIGNATURE]
        name = next(iter(meta["signatures"][SEARCH_SIGNATURE]["inputs"]))
        queries = list(images or [])
        batches = []
        for i in range(0, len(queries), batch_size):
            chunk = queries[i:i + batch_size]
            try:
                if name == BYTES_INPUT:
                    value = tf.constant([_read_bytes(p) for p in chunk])
                else:
                    value = tf.constant(np.stack([np.load(p) for p in chunk]).astype(np.float32))
            except (OSError, ValueError) as e:
                raise sm.ExportError(f"cannot read the query images: {e}") from e
            batches.append({name: value})
    rows = []
    start = 0
    for feed in batches:
        try:
            out = fn(**feed, k=tf.constant(int(k), tf.int32))
        except tf.errors.InvalidArgumentError as e:
            first = (e.message or str(e)).strip().splitlines()[0]
            raise sm.ExportError(f"{path}: the search signature refused the queries "
                                 f"{queries[start]}..: {first}") from e
        genes, ids = out["genes"].numpy(), out["ids"].numpy()
        dist, idx = out["distances"].numpy(), out["indices"].numpy()
        for b in range(genes.shape[0]):
            for r in range(genes.shape[1]):
                rows.append({"query": queries[start + b], "rank": r + 1,
                             "gene": genes[b, r].decode(), "id": ids[b, r].decode(),
                             "distance": float(dist[b, r]), "index": int(idx[b, r])})
        start += genes.shape[0]
    return path, pd.DataFrame(rows, columns=["query", "rank", "gene", "id", "distance", "index"])


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def describe_search(meta: Mapping[str, Any]) -> str:
    """Lines for `bin/export`'s summary: the search signatures and their index."""
    index = meta["search"]["index"]
    lines = [f"  search index: {index['size']} {index['level']}-level vectors "
             f"(D={index['dim']}, {index['metric']}) from {index['source']}"]
    for sig in (SEARCH_SIGNATURE, SEARCH_EMBEDDING_SIGNATURE):
        entry = meta["signatures"].get(sig, {})
        inputs = "; ".join(entry.get("inputs", {}))
        lines.append(f"  {sig}: {inputs} -> {', '.join(entry.get('outputs', []))}")
    return "\n".join(lines)

"""Nearest-gene search in the exported SavedModel vs numpy brute force (run by hand).

For each index size (default 1,000 and 100,000 stored vectors, D = 128, euclidean)
exports a tiny image model with `--search_index` (`ish_tf.export.search`), loads the
SavedModel as TF Serving would (tf.saved_model.load, the signatures only) and measures
on CPU, in the same process:

  (a) baseline: numpy brute force in float32 (|q|² - 2 q·c + |c|² as one matmul,
      argpartition for the top k, then a sort of the k), on the same queries;
  (b) the `search_embedding` signature (embedding + k -> top-k genes, names gathered
      in the graph);
  (c) the `search` signature from PNG bytes (decode + tiny CNN + top-k).

Latency: one query per call (median of --repeats calls). Throughput: --batch queries
per call (best of 3). Ratios are numpy time / signature time (> 1: the SavedModel is
faster). The top-k indices of (b) are checked against (a).

    .venv/bin/python bench/bench_search.py [--sizes 1000,100000] [--dim 128] [--k 10]
        [--batch 256] [--repeats 50] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tensorflow as tf  # noqa: E402

from ish_tf.export import saved_model as sm  # noqa: E402
from ish_tf.export import search  # noqa: E402


def _model(dim: int, size: int = 16):
    import keras

    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(dim, name="embedding")(x)
    return keras.Model(inputs, x, name="bench_search")


def numpy_top_k(queries: np.ndarray, values: np.ndarray, sq: np.ndarray, k: int):
    """The baseline: float32 brute force, top-k by argpartition then a sort of the k."""
    d = (queries * queries).sum(1)[:, None] - 2.0 * queries @ values.T + sq[None, :]
    part = np.argpartition(d, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(d, part, 1), axis=1)
    idx = np.take_along_axis(part, order, 1)
    return np.sqrt(np.maximum(np.take_along_axis(d, idx, 1), 0)), idx


def _median_latency(fn, calls) -> float:
    fn(calls[0])
    times = []
    for c in calls:
        start = time.perf_counter()
        fn(c)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _throughput(fn, batch, n: int) -> float:
    fn(batch)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        fn(batch)
        best = min(best, time.perf_counter() - start)
    return n / best


def run_size(n: int, args, tmp: str) -> dict:
    rng = np.random.default_rng(n)
    values = rng.normal(0, 1, (n, args.dim)).astype(np.float32)
    table = pd.DataFrame(values, columns=[str(i) for i in range(args.dim)])
    table.insert(0, "gene_symbol", [f"GENE{i}" for i in range(n)])
    index = search.index_from_table(
        __import__("ish_tf.data.embeddings", fromlist=["from_frame"]).from_frame(table))
    path = sm.export_saved_model(_model(args.dim), os.path.join(tmp, f"s{n}"), family="x",
                                 outputs=("embedding",), search_index=index)
    loaded = tf.saved_model.load(path)
    by_embedding = loaded.signatures["search_embedding"]
    by_image = loaded.signatures["search"]
    k = tf.constant(args.k)

    queries = rng.normal(0, 1, (args.batch, args.dim)).astype(np.float32)
    sq = (values * values).sum(1)
    _, ref = numpy_top_k(queries, values, sq, args.k)
    got = by_embedding(embedding=tf.constant(queries), k=k)["indices"].numpy()
    agree = float((got == ref).all(axis=1).mean())

    singles = [queries[i:i + 1] for i in range(min(args.repeats, args.batch))]
    pngs = [tf.io.encode_png(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).numpy()
            for _ in range(args.batch)]
    res = {"n": n, "agree": agree}
    res["numpy_lat"] = _median_latency(lambda q: numpy_top_k(q, values, sq, args.k), singles)
    res["emb_lat"] = _median_latency(
        lambda q: by_embedding(embedding=tf.constant(q), k=k)["genes"].numpy(), singles)
    res["img_lat"] = _median_latency(
        lambda b: by_image(image_bytes=tf.constant([b]), k=k)["genes"].numpy(),
        pngs[:len(singles)])
    res["numpy_tp"] = _throughput(lambda q: numpy_top_k(q, values, sq, args.k), queries,
                                  args.batch)
    res["emb_tp"] = _throughput(
        lambda q: by_embedding(embedding=tf.constant(q), k=k)["genes"].numpy(), queries,
        args.batch)
    res["img_tp"] = _throughput(
        lambda b: by_image(image_bytes=tf.constant(b), k=k)["genes"].numpy(), pngs, args.batch)
    res["size_mb"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path)
                         for f in fs) / 2**20
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="TF intra-op threads (0 = TF's)")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    print(f"D={args.dim}, k={args.k}, euclidean, CPU; latency = median of one-query calls, "
          f"throughput = {args.batch} queries per call")
    print("| stored vectors | numpy latency | search_embedding latency | search (PNG) latency "
          "| numpy q/s | search_embedding q/s | search (PNG) q/s | numpy/search_embedding "
          "(latency, throughput) | top-k agreement | SavedModel MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            r = run_size(n, args, tmp)
            print(f"| {n:,} | {r['numpy_lat'] * 1e3:.2f} ms | {r['emb_lat'] * 1e3:.2f} ms | "
                  f"{r['img_lat'] * 1e3:.2f} ms | {r['numpy_tp']:,.0f} | {r['emb_tp']:,.0f} | "
                  f"{r['img_tp']:,.0f} | {r['numpy_lat'] / r['emb_lat']:.2f}x, "
                  f"{r['emb_tp'] / r['numpy_tp']:.2f}x | {r['agree']:.3f} | "
                  f"{r['size_mb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()

"""Reading benchmark of the tf.data pipelines (run by hand; prints images/s and ratios).

Writes N JPEG patches (default 2,000 of 256×256, 40 genes, 8 shards) to a temporary
directory with `ish_tf.data.records`, then measures in the same process:

  (a) the full plain reader `patch_dataset` (read, shuffle, parse, decode, flip, batch);
  (b) the baseline: decode-only over the same encoded patches held in memory
      (`from_tensor_slices(bytes).map(decode_jpeg, AUTOTUNE).batch`), i.e. the same
      parallel decoding with no file reading, parsing, shuffling or flipping;
  (c) the P×K reader `pk_dataset` (P genes × K patches per batch);

and, to show what the gap between the readers and (b) consists of:

  (d) decode-only plus the float32 cast the readers' output type requires;
  (e) the plain reader's work without decoding: read, shuffle, batch, one batched parse;
  (f) the P×K reader's Python record reads alone (sampler draws, positioned reads,
      framing checks), no TensorFlow.

Besides images/s (wall clock, best of the round-robin repeats), each case's CPU time per
image (all threads of the process, least of the repeats) is printed: on a shared machine
the wall-clock rate swings with other jobs, the CPU cost much less, and on an idle
machine with every core busy the wall-clock ratio approaches the CPU-cost ratio.

Goal (issue 24): (a) / (b) and (c) / (b) ≥ 0.85, i.e. the pipeline costs little beyond
JPEG decoding.

    .venv/bin/python bench/bench_pipeline.py [--n 2000] [--size 256] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from ish_tf.data import pipeline, records, shards  # noqa: E402


def synthetic_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth, ISH-like patch (blurred blobs + grain) so JPEG sizes are realistic."""
    small = rng.random((size // 16, size // 16, 3)) * 255
    img = np.asarray(Image.fromarray(small.astype(np.uint8)).resize((size, size),
                                                                     Image.BILINEAR), np.float32)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_records(out: str, n: int, size: int, n_genes: int, n_shards: int,
                  seed: int = 0) -> list[bytes]:
    """Writes n patches like bin/extract would; returns the encoded JPEGs in write order."""
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    info = shards.DatasetInfo(genes=shards.make_gene_vocabulary(genes), source_size=size,
                               patch_size=size, format="jpeg", seed=seed)
    shards.write_dataset_info(out, info)
    per_gene = np.full(n_genes, n // n_genes)
    per_gene[: n - per_gene.sum()] += 1
    shard_of = shards.assign_shards(genes, n_shards)
    gene_index = info.gene_index()
    encoded: list[bytes] = []
    for k in range(n_shards):
        with shards.ShardWriter(out, "train", k, n_shards) as w:
            for g in (g for g in genes if shard_of[g] == k):
                for p in range(per_gene[gene_index[g]]):
                    buf = io.BytesIO()
                    Image.fromarray(synthetic_patch(rng, size)).save(buf, "JPEG", quality=90)
                    data = buf.getvalue()
                    encoded.append(data)
                    image_id = gene_index[g] * 1000 + p // 8
                    w.write(records.make_example(
                        image_encoded=data, image_height=size, image_width=size,
                        image_id=image_id, patch_index=p % 8, gene_symbol=g,
                        gene_index=gene_index[g]), g, image_id)
        shards.update_index(out, w.info)
    return encoded


def measure(ds, batch_images: int, min_images: int, warmup: int = 3) -> tuple[float, float]:
    """Iterates `ds` (a Dataset, or any iterable) after `warmup` batches until min_images
    images; returns (images/s, CPU µs of the whole process per image)."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while n < min_images:
        next(it)
        n += batch_images
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1e6


def images_per_second(ds: tf.data.Dataset, batch_images: int, min_images: int,
                      warmup: int = 3) -> float:
    """Iterates `ds` (after `warmup` batches) until min_images images; returns images/s."""
    return measure(ds, batch_images, min_images, warmup)[0]


class _PKReads:
    """The P×K reader's Python part alone: batch t's draws and record reads, no decoding."""

    def __init__(self, records_dir: str, P: int, K: int):
        from ish_tf.data.input_checks import index_record_counts

        extents = shards.gene_extents(records_dir, "train")
        files = sorted({e.file for e in extents})
        file_id = {f: i for i, f in enumerate(files)}
        self.reader = pipeline._RecordReader(
            files, index_record_counts(records_dir, "train", files))
        self.sampler = pipeline.PKSampler([e.count for e in extents], P, K, seed=0)
        self.gene_file = [file_id[e.file] for e in extents]
        self.starts = [e.offset for e in extents]

    def __iter__(self):
        t = 0
        while True:
            genes, recs, _ = self.sampler.batch(t)
            yield [self.reader.read(self.gene_file[g], self.starts[g] + int(i))
                   for g, i in zip(genes, recs, strict=True)]
            t += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="patches to write")
    ap.add_argument("--size", type=int, default=256, help="patch side R")
    ap.add_argument("--genes", type=int, default=40)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--P", type=int, default=16)
    ap.add_argument("--K", type=int, default=4)
    ap.add_argument("--images", type=int, default=6000, help="images timed per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        encoded = write_records(out, args.n, args.size, args.genes, args.shards)
        mb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**20
        print(f"wrote {args.n} JPEG {args.size}x{args.size} patches, {args.shards} shards, "
              f"{mb:.1f} MiB in {time.perf_counter() - t0:.1f} s; cpus={os.cpu_count()}")

        full = pipeline.patch_dataset(out, "train", batch_size=args.batch, training=True,
                                      flips=True, shuffle_buffer=1024)
        base = (tf.data.Dataset.from_tensor_slices(tf.constant(encoded)).repeat()
                .map(lambda e: tf.io.decode_jpeg(e, channels=3), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
        pk = pipeline.pk_dataset(out, "train", P=args.P, K=args.K, flips=True, deterministic=False)
        pk_det = pipeline.pk_dataset(out, "train", P=args.P, K=args.K, flips=True)

        base_float = (tf.data.Dataset.from_tensor_slices(tf.constant(encoded)).repeat()
                      .map(lambda e: tf.cast(tf.io.decode_jpeg(e, channels=3), tf.float32),
                           num_parallel_calls=tf.data.AUTOTUNE)
                      .batch(args.batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE))
        files = pipeline.list_shards(out, "train")
        no_decode = (tf.data.Dataset.from_tensor_slices(files).shuffle(len(files)).repeat()
                     .interleave(tf.data.TFRecordDataset, num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=False)
                     .shuffle(1024).batch(args.batch, drop_remainder=True)
                     .map(lambda s: tf.io.parse_example(s, records.feature_spec(
                         ["image/encoded", records.IDENTITY_INDEX_KEY])),
                          num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE))

        cases = {"base": (base, args.batch), "full": (full, args.batch),
                 "pk": (pk, args.P * args.K), "pk_det": (pk_det, args.P * args.K),
                 "base_float": (base_float, args.batch), "no_decode": (no_decode, args.batch),
                 "pk_reads": (_PKReads(out, args.P, args.K), args.P * args.K)}
        best = dict.fromkeys(cases, 0.0)
        cpu = dict.fromkeys(cases, float("inf"))
        # Round-robin repeats, best of each: the machine may be shared, and alternating
        # keeps a burst of load from favouring one case.
        for _ in range(args.repeats):
            for name, (ds, b) in cases.items():
                rate, us = measure(ds, b, args.images)
                best[name], cpu[name] = max(best[name], rate), min(cpu[name], us)
        r_base, r_full, r_pk, r_pk_det = (best[k] for k in ("base", "full", "pk", "pk_det"))
        print(f"(b) decode-only baseline (in memory)  : {r_base:9.0f} images/s")
        print(f"(a) patch_dataset full pipeline        : {r_full:9.0f} images/s  "
              f"ratio a/b = {r_full / r_base:.2f} (goal >= 0.8)")
        print(f"(c) pk_dataset P={args.P} K={args.K} (nondeterministic): {r_pk:9.0f} images/s  "
              f"ratio c/b = {r_pk / r_base:.2f}")
        print(f"(c) pk_dataset P={args.P} K={args.K} (deterministic)   : {r_pk_det:9.0f} images/s  "
              f"ratio c/b = {r_pk_det / r_base:.2f}")
        print(f"(d) decode-only + float32 cast (in memory): {best['base_float']:9.0f} images/s  "
              f"ratio d/b = {best['base_float'] / r_base:.2f}")
        print(f"    readers against (d), decoding with the same float32 output: "
              f"a/d = {r_full / best['base_float']:.2f}, c/d = {r_pk / best['base_float']:.2f} "
              f"(nondeterministic), {r_pk_det / best['base_float']:.2f} (deterministic)")
        print(f"(e) read+shuffle+parse, no decode      : {best['no_decode']:9.0f} images/s")
        print(f"(f) pk_dataset's Python reads, no decode: {best['pk_reads']:9.0f} images/s")
        print("CPU time per image (least of the repeats; ratio = b's CPU time / the case's):")
        labels = {"base": "(b) decode-only", "full": "(a) patch_dataset",
                  "pk": "(c) pk_dataset nondeterministic", "pk_det": "(c) pk_dataset deterministic",
                  "base_float": "(d) decode-only + float32 cast",
                  "no_decode": "(e) read+shuffle+parse, no decode",
                  "pk_reads": "(f) pk Python reads, no decode"}
        for name, label in labels.items():
            print(f"  {label:36s}: {cpu[name]:7.0f} us/image  ratio {cpu['base'] / cpu[name]:.2f}")
        print(f"load average after: {open('/proc/loadavg').read().split()[:3]}; "
              f"ish_tf from {os.path.dirname(pipeline.__file__)}")


if __name__ == "__main__":
    main()

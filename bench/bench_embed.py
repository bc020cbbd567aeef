"""Embedding throughput of the exported SavedModel (run by hand; prints patches/s, ratios).

Builds a triplet model (default: the quickstart's small_cnn, 64×64 input, random
weights), exports it with `ish_tf.export`, writes N JPEG patches to TFRecord shards,
then measures in the same process:

  (a) baseline: the Keras model called on pre-decoded float32 batches (no decoding,
      no file reading): the cost of the network alone;
  (b) the SavedModel's `serving_default` on in-memory encoded JPEG batches (decode +
      network inside the served graph);
  (c) `ish_tf.embed.embed_records` end to end (read shards, parse, serve, write the
      four tables), counting the embedding loop only (`patches_per_sec`).

Ratios (b)/(a) and (c)/(a) show what serving from bytes and the file pipeline cost
on top of the network.

    .venv/bin/python bench/bench_embed.py [--n 1024] [--batch 64] [--backbone small_cnn]
        [--size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ish_tf import embed  # noqa: E402
from ish_tf.data import records, shards  # noqa: E402
from ish_tf.export import saved_model as sm  # noqa: E402
from ish_tf.families import ModelConfig, build_model  # noqa: E402


def _patches(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.random((n, size // 8, size // 8, 3)) * 255
    imgs = tf.image.resize(small, [size, size]).numpy() + rng.normal(0, 12, (n, size, size, 3))
    return np.clip(imgs, 0, 255).astype(np.uint8)


def _rate(fn, batches, n: int, repeats: int = 2) -> float:
    fn(batches[0])  # trace / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            fn(b)
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backbone", default="small_cnn", choices=["small_cnn", "resnet50"])
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()

    from ish_tf.families.triplet.config import TripletConfig

    model = build_model(ModelConfig("triplet", input_size=args.size, seed=0, family=TripletConfig(
        backbone=args.backbone, backbone_weights="none", head_units=256, embedding_dim=64)))
    pixels = _patches(args.n, args.size)
    encoded = [tf.io.encode_jpeg(p, quality=90).numpy() for p in pixels]
    with tempfile.TemporaryDirectory() as tmp:
        export = sm.export_saved_model(model, os.path.join(tmp, "export"))
        loaded = tf.saved_model.load(export)
        serve = loaded.signatures["serving_default"]

        float_batches = [tf.constant(pixels[i:i + args.batch], tf.float32)
                         for i in range(0, args.n, args.batch)]
        byte_batches = [tf.constant(encoded[i:i + args.batch])
                        for i in range(0, args.n, args.batch)]
        keras_fn = tf.function(lambda x: model(x, training=False))
        base = _rate(keras_fn, float_batches, args.n)
        served = _rate(lambda b: serve(image_bytes=b), byte_batches, args.n)

        rec_dir = os.path.join(tmp, "records")
        per_gene = 32
        genes = [f"G{i:03d}" for i in range((args.n + per_gene - 1) // per_gene)]
        for shard in range(2):
            with shards.ShardWriter(rec_dir, "train", shard, 2) as w:
                for gi, gene in enumerate(genes):
                    if gi % 2 != shard:
                        continue
                    for j in range(gi * per_gene, min((gi + 1) * per_gene, args.n)):
                        w.write(records.make_example(
                            image_encoded=encoded[j], image_height=args.size,
                            image_width=args.size, image_id=j // 8, patch_index=j % 8,
                            gene_symbol=gene, gene_index=gi, donor_id=f"D{j % 3}"),
                            gene, j // 8)
            shards.update_index(rec_dir, w.info)
        start = time.perf_counter()
        result = embed.embed_records(embed.EmbedConfig(
            saved_model=export, records_dir=rec_dir, out_dir=os.path.join(tmp, "embed"),
            batch_size=args.batch), progress=False)
        total = time.perf_counter() - start

    print(f"backbone={args.backbone} input={args.size}x{args.size} n={args.n} "
          f"batch={args.batch} threads={os.cpu_count()} gpus={len(tf.config.list_physical_devices('GPU'))}")
    print(f"(a) keras on decoded float32 (baseline): {base:9.1f} patches/s")
    print(f"(b) SavedModel serving_default on bytes: {served:9.1f} patches/s  "
          f"ratio b/a = {served / base:.2f}")
    print(f"(c) embed_records, embedding loop:       {result.patches_per_sec:9.1f} patches/s  "
          f"ratio c/a = {result.patches_per_sec / base:.2f}")
    print(f"    embed_records incl. load + tables:   {args.n / total:9.1f} patches/s "
          f"({total:.1f} s)")


if __name__ == "__main__":
    main()

"""Where the plain reader's time goes: `patch_dataset` built up one step at a time.

Run by hand (not a test):
  .venv/bin/python bench/bench_pipeline_stages.py [--n 2000] [--repeats 3]

Writes the same records as `bench_pipeline.py` (2,000 JPEG 256×256 patches, 8 shards),
then measures, round-robin and best of `--repeats`, images/s of pipelines that each add
one step of `ish_tf.data.pipeline.patch_dataset` to the previous one, all with parallel
maps (AUTOTUNE), batch 64 and prefetch:

  decode-only       encoded bytes held in memory -> decode_jpeg (bench_pipeline's baseline)
  + read            TFRecordDataset interleave -> parse image/encoded -> decode
  + label           ... also parse the label (gene_index)
  + where           ... the per-record "shard: record N" string the reader builds for errors
  + check           ... the image-bytes check (tf.debugging.Assert on the magic bytes)
  + flips           ... stateless flip bits per record, tf.cond flips, cast to float32
  + shuffle         ... the 1,024-record shuffle buffer: this is `patch_dataset` itself
  patch_dataset     the library function, for reference
  shuffle, uint8 flips, cast per batch: the last stage with the flips on uint8 and the
                    cast to float32 once per batch (a candidate change)

and prints each one's ratio to decode-only, so the cost of each step reads off as the
drop from the line above.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import tensorflow as tf  # noqa: E402
from bench_pipeline import images_per_second, write_records  # noqa: E402

from ish_tf.data import pipeline, records  # noqa: E402
from ish_tf.data.input_checks import checked_image_bytes  # noqa: E402
from ish_tf.data.inputs import InputSpec  # noqa: E402

AUTOTUNE = tf.data.AUTOTUNE


def staged(files: list[str], batch: int, size: int, upto: str,
           cast_per_batch: bool = False) -> tf.data.Dataset:
    """The reader with the steps up to `upto` (see the module docstring); with
    `cast_per_batch`, the flips stay on uint8 and the cast to float32 runs once per batch."""
    steps = ["read", "label", "where", "check", "flips", "shuffle"]
    on = set(steps[:steps.index(upto) + 1])
    spec = InputSpec.image(3, size, size)
    ds = tf.data.Dataset.from_tensor_slices(files).repeat()
    if "where" in on:
        ds = ds.interleave(
            lambda f: tf.data.TFRecordDataset(f).enumerate().map(
                lambda n, r: (r, tf.strings.join([f, ": record ", tf.strings.as_string(n)]))),
            block_length=1, num_parallel_calls=AUTOTUNE, deterministic=False)
    else:
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f).map(lambda r: (r, "")),
                           block_length=1, num_parallel_calls=AUTOTUNE, deterministic=False)
    if "shuffle" in on:
        ds = ds.shuffle(1024, seed=1)
    ds = ds.enumerate()
    keys = ["image/encoded"] + (["gene_index"] if "label" in on else [])

    def parse(i, element):
        serialized, where = element
        feats = records.parse_example(serialized, keys)
        if "check" in on:
            feats = checked_image_bytes(feats, spec, where)
        image = tf.io.decode_jpeg(feats["image/encoded"], channels=3)
        if "flips" in on:
            flip = pipeline.flip_bits(tf.stack([tf.constant(0, tf.int64), i]))
            if cast_per_batch:
                image = tf.cond(flip[0], lambda: tf.reverse(image, axis=[1]), lambda: image)
                image = tf.cond(flip[1], lambda: tf.reverse(image, axis=[0]), lambda: image)
            else:
                image = pipeline.augment_image(image, flip)
        if "label" in on:
            return image, tf.cast(feats["gene_index"], tf.int32)
        return image

    ds = ds.map(parse, num_parallel_calls=AUTOTUNE, deterministic=False)
    ds = ds.batch(batch, drop_remainder=True)
    if cast_per_batch:
        ds = ds.map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE).with_options(
        pipeline._options(False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as out:
        encoded = write_records(out, args.n, args.size, 40, 8)
        files = pipeline.list_shards(out, "train")
        base = (tf.data.Dataset.from_tensor_slices(tf.constant(encoded)).repeat()
                .map(lambda e: tf.io.decode_jpeg(e, channels=3), num_parallel_calls=AUTOTUNE)
                .batch(args.batch, drop_remainder=True).prefetch(AUTOTUNE))
        cases = {"decode-only": base}
        for step in ("read", "label", "where", "check", "flips", "shuffle"):
            cases[f"+ {step}"] = staged(files, args.batch, args.size, step)
        cases["shuffle, uint8 flips, cast per batch"] = staged(files, args.batch, args.size,
                                                               "shuffle", cast_per_batch=True)
        cases["patch_dataset"] = pipeline.patch_dataset(out, "train", batch_size=args.batch,
                                                        training=True, flips=True,
                                                        shuffle_buffer=1024)
        best = dict.fromkeys(cases, 0.0)
        for _ in range(args.repeats):
            for name, ds in cases.items():
                best[name] = max(best[name], images_per_second(ds, args.batch, args.images))
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores; best of "
              f"{args.repeats}, round-robin")
        for name, rate in best.items():
            print(f"  {name:<37} {rate:8.0f} images/s  {rate / best['decode-only']:.2f} of "
                  "decode-only")


if __name__ == "__main__":
    main()

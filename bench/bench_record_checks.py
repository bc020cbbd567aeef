"""Cost of checking every record's CRC32C in the P×K reader, against decoding it.

The P×K reader (`ish_tf.data.pipeline.pk_dataset`) reads records by byte offset and checks
each one's TFRecord framing (masked CRC32C of length and data, `ish_tf.data.framing`) before
parsing, in Python (TensorFlow's own check is inside TFRecordDataset, which the positioned
reads bypass). This measures, in one process and on the same 256×256 JPEG records:

  (a) `framing.check_record_framing` per record (the first read of a record);
  (b) the baseline: `tf.io.decode_jpeg` of the same patch (what every read pays anyway);
  (c) zlib's CRC-32 of the same bytes (what later reads of a record compare against).

    .venv/bin/python bench/bench_record_checks.py [--n 400] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import struct
import time
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ish_tf.data import framing, records  # noqa: E402


def _framed(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", framing.masked_crc32c(length)) + data
            + struct.pack("<I", framing.masked_crc32c(data)))


def _per_item(fn, items, repeats: int = 3) -> float:
    """Best of `repeats` mean seconds per item."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, (time.perf_counter() - t0) / len(items))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    from bench_pipeline import synthetic_patch

    rng = np.random.default_rng(0)
    jpegs = [tf.io.encode_jpeg(synthetic_patch(rng, args.size), quality=90).numpy()
             for _ in range(args.n)]
    framed = [_framed(records.make_example(
        image_encoded=j, image_height=args.size, image_width=args.size, image_id=i,
        gene_symbol="G", gene_index=0)) for i, j in enumerate(jpegs)]
    crc = _per_item(framing.check_record_framing, framed)
    decode = _per_item(lambda j: tf.io.decode_jpeg(j).numpy(), jpegs)
    later = _per_item(lambda r: zlib.crc32(r), framed)
    kb = np.mean([len(r) for r in framed]) / 1024
    print(f"{args.n} records of {args.size}x{args.size} JPEG, mean {kb:.1f} KiB")
    print(f"  CRC32C check (first read)   {crc * 1e6:8.1f} us/record  "
          f"{crc / decode:.2f}x of decoding")
    print(f"  zlib CRC-32 (later reads)   {later * 1e6:8.1f} us/record  "
          f"{later / decode:.2f}x of decoding")
    print(f"  baseline: JPEG decode       {decode * 1e6:8.1f} us/record")


if __name__ == "__main__":
    main()

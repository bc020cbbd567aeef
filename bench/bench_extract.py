"""Benchmark: end-to-end `run_extract` throughput (images/s, patches/s) with 1 and 2 workers.

Run by hand (not a test):
  .venv/bin/python bench/bench_extract.py [--images=8 --height=2048 --width=2560]
      [--source_size=1024 --patch_size=256 --n=50 --workers=1,2] [--data_dir=DIR]

Renders synthetic sections (`ish_tf.data.synthetic`, Allen-like sizes by default) or
reuses a dataset directory holding manifest.csv, then runs the whole extract stage
(decode, classical mask, sampling, crop + antialiased resize, JPEG encode, TFRecord
shards, index) into a fresh directory per worker count, in this one process, and
prints images/s, patches/s and the speed-up of each worker count over 1 worker.
Masks are recomputed in every run (fresh output directories, no mask cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ish_tf.data import patches as P  # noqa: E402
from ish_tf.data.synthetic import SynthConfig, generate_dataset  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--height", type=int, default=2048)
    ap.add_argument("--width", type=int, default=2560)
    ap.add_argument("--source_size", type=int, default=1024)
    ap.add_argument("--patch_size", type=int, default=256)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--data_dir", default="", help="reuse a dataset directory (manifest.csv)")
    args = ap.parse_args()

    import tensorflow as tf  # noqa: F401  (import cost kept out of the first timing)

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        data = args.data_dir
        if not data:
            data = os.path.join(tmp, "synth")
            n_genes = max(3, (args.images + 1) // 2)
            t = time.perf_counter()
            generate_dataset(SynthConfig(out_dir=data, n_genes=n_genes, n_groups=n_genes,
                                         n_donors=2, donors_per_gene=2, images_per_gene_donor=1,
                                         height=args.height, width=args.width, seed=0))
            print(f"rendered {2 * n_genes} synthetic {args.width}x{args.height} sections in "
                  f"{time.perf_counter() - t:.1f} s")
        base_rate = None
        for workers in [int(w) for w in args.workers.split(",")]:
            cfg = P.ExtractConfig(manifest=os.path.join(data, "manifest.csv"),
                                  out_dir=os.path.join(tmp, f"out_{workers}"),
                                  patches_per_image=args.n, source_size=args.source_size,
                                  patch_size=args.patch_size, workers=workers, num_shards=2)
            t = time.perf_counter()
            summary = P.run_extract(cfg, progress_enabled=False)
            dt = time.perf_counter() - t
            images = sum(s["images"] for s in summary["splits"].values())
            patches = sum(s["patches"] for s in summary["splits"].values())
            rate = images / dt
            base_rate = base_rate or rate
            print(f"workers={workers}: {images} images, {patches} patches in {dt:.2f} s -> "
                  f"{rate:.2f} images/s, {patches / dt:.1f} patches/s "
                  f"({rate / base_rate:.2f}x of 1 worker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

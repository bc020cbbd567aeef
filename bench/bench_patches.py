"""Benchmark: patch sampling with a summed-area table versus the naive re-counting baseline.

Run by hand (not a test):
  .venv/bin/python bench/bench_patches.py [--images=6 --height=2048 --width=2560]
      [--source_size=1024 --n=50 --min_fraction=0.9 --max_tries=500 --repeats=3]

Renders synthetic sections with `ish_tf.data.synthetic` (Allen-like sizes by default),
computes their classical masks once, then, for each image and repeat, samples with
  (a) `sample_patches`: build the integral image, score all T candidates at once;
  (b) `naive_sample_patches`: the same candidates, each re-counting its S×S window
      (`mask[y:y+S, x:x+S].mean()`), stopping at N accepted.
Both use the same seeded generator per (repeat, image); the script checks that they
return identical windows and that every window meets the tissue fraction, and prints
the total time of each and the ratio (goal: >= 10x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ish_tf.data import patch_sampling as S  # noqa: E402
from ish_tf.data.segment import classical_mask  # noqa: E402
from ish_tf.data.synthetic import SynthConfig, generate_dataset  # noqa: E402

GOAL = 10.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--height", type=int, default=2048)
    ap.add_argument("--width", type=int, default=2560)
    ap.add_argument("--source_size", type=int, default=1024)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--min_fraction", type=float, default=0.9)
    ap.add_argument("--max_tries", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data_dir", default="", help="reuse a synthetic dataset (manifest.csv)")
    args = ap.parse_args()

    tmp = None
    data = args.data_dir
    if not data:
        tmp = tempfile.TemporaryDirectory(prefix="bench_patches_")
        data = tmp.name
        n_genes = max(1, (args.images + 1) // 2)
        t = time.perf_counter()
        generate_dataset(SynthConfig(out_dir=data, n_genes=n_genes, n_groups=n_genes, n_donors=2,
                                     donors_per_gene=2, images_per_gene_donor=1,
                                     height=args.height, width=args.width, seed=0))
        print(f"rendered {2 * n_genes} synthetic {args.width}x{args.height} sections "
              f"in {time.perf_counter() - t:.1f} s")
    import pandas as pd

    manifest = pd.read_csv(os.path.join(data, "manifest.csv")).head(args.images)
    masks = []
    for row in manifest.itertuples(index=False):
        with Image.open(os.path.join(data, row.path)) as im:
            masks.append((int(row.image_id), classical_mask(np.asarray(im.convert("RGB")))))
    print(f"{len(masks)} masks, tissue fraction "
          f"{np.mean([m.mean() for _, m in masks]):.2f} on average; S={args.source_size}, "
          f"N={args.n}, F={args.min_fraction}, T={args.max_tries}, {args.repeats} repeat(s)")

    kw = dict(n=args.n, size=args.source_size, min_fraction=args.min_fraction,
              max_tries=args.max_tries)
    t_fast = t_naive = 0.0
    total = 0
    for rep in range(args.repeats):
        for image_id, mask in masks:
            t = time.perf_counter()
            fast = S.sample_patches(mask, rng=S.image_rng(rep, image_id), **kw)
            t_fast += time.perf_counter() - t
            t = time.perf_counter()
            naive = S.naive_sample_patches(mask, rng=S.image_rng(rep, image_id), **kw)
            t_naive += time.perf_counter() - t
            if fast != naive:
                print(f"MISMATCH on image {image_id}, repeat {rep}")
                return 1
            for x, y in fast:
                frac = mask[y:y + args.source_size, x:x + args.source_size].mean()
                if frac < args.min_fraction:
                    print(f"CONSTRAINT VIOLATED: image {image_id} window ({x}, {y}) has {frac:.3f}")
                    return 1
            total += len(fast)
    calls = args.repeats * len(masks)
    ratio = t_naive / max(t_fast, 1e-12)
    print(f"patches sampled: {total} ({total / calls:.1f} per image), identical in both, "
          f"all with tissue >= {args.min_fraction}")
    print(f"summed-area table: {t_fast:.3f} s ({1e3 * t_fast / calls:.1f} ms per image)")
    print(f"naive baseline:    {t_naive:.3f} s ({1e3 * t_naive / calls:.1f} ms per image)")
    print(f"speed-up: {ratio:.1f}x (goal >= {GOAL:.0f}x) -> {'OK' if ratio >= GOAL else 'BELOW GOAL'}")
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: ISH CNN dense (fully convolutional) prediction against cropped sliding windows.

Run by hand (not a test):  .venv/bin/python bench/bench_ish_cnn_predict.py [--side=512]

Builds an (untrained) ISH CNN per patch size, predicts a random grey section of
side x side pixels at stride 4 with both methods (identical outputs, checked), and
prints the wall time of each and the ratio sliding / dense (the baseline is the
sliding-window method, measured in the same run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from ish_tf.families import ModelConfig, build_model  # noqa: E402
from ish_tf.families.ish_cnn import segmentation as seg  # noqa: E402
from ish_tf.families.ish_cnn.config import IshCnnConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--stride", type=int, default=4)
    parser.add_argument("--sizes", default="16,32,48,64,128")
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 256, (args.side, args.side)).astype(np.uint8)
    print(f"section {args.side} x {args.side}, stride {args.stride}")
    print(f"{'patch':>6} {'dense_s':>9} {'sliding_s':>10} {'ratio':>7} {'max_abs_diff':>13}")
    for size in (int(s) for s in args.sizes.split(",")):
        model = build_model(ModelConfig(
            model="ish_cnn", input_size=size, seed=0, family=IshCnnConfig(
                head_units=32, n_classes=4, filters=(16, 32, 48, 64))))
        seg.dense_probabilities(model, image[:64, :64], args.stride, "dense")  # warm-up
        t0 = time.perf_counter()
        dense, _ = seg.dense_probabilities(model, image, args.stride, "dense")
        t1 = time.perf_counter()
        slide, _ = seg.dense_probabilities(model, image, args.stride, "sliding", batch_size=512)
        t2 = time.perf_counter()
        print(f"{size:>6} {t1 - t0:>9.2f} {t2 - t1:>10.2f} {(t2 - t1) / (t1 - t0):>7.1f} "
              f"{float(np.abs(dense - slide).max()):>13.2e}")


if __name__ == "__main__":
    main()

"""Robustness of the classical tissue masks to scanner and stain differences (issue 21).

Runs the older segmenter (`method="deficit"`) and the optical-density one (`method="od"`,
the default) on the real Allen section (../shared/data/allen), on a mostly-tissue crop of
it, and on synthetic sections with true masks, unperturbed and under each perturbation of
`ish_tf.data.stain_perturb.PERTURBATIONS`. Prints, per image set, perturbation and method,
the IoU with the unperturbed mask of the same method (and, on synthetic sections, with the
true mask), and the tissue fraction; the worst IoU over the set is the figure reported.

  PYTHONPATH=. python bench/bench_masks.py [--synthetic=4]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from ish_tf.data import segment as S
from ish_tf.data.stain_perturb import PERTURBATIONS

ALLEN = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "allen",
                     "mouse_prox1_sagittal_ds2.jpg")
METHODS = ("deficit", "od")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def image_sets(n_synth: int) -> list[tuple[str, list[tuple[np.ndarray, np.ndarray | None]]]]:
    sets = []
    path = os.environ.get("ALLEN_IMAGE", ALLEN)
    if os.path.exists(path):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        sets.append(("allen section 2980x1888", [(rgb, None)]))
        sets.append(("allen crop 1600x1200 (mostly tissue)", [(rgb[400:1600, 700:2300], None)]))
    else:
        print(f"# {path} absent: real-section rows skipped", file=sys.stderr)
    if n_synth:
        from ish_tf.data.synthetic import SynthConfig, generate_dataset

        out = tempfile.mkdtemp(prefix="bench_masks_")
        df = generate_dataset(SynthConfig(out_dir=out, n_genes=max(1, n_synth // 2), n_donors=2, n_groups=1,
                                          donors_per_gene=2, images_per_gene_donor=1,
                                          height=600, width=800, seed=11))
        pairs = [(np.asarray(Image.open(os.path.join(out, "images", f"{i}.jpg")).convert("RGB")),
                  np.asarray(Image.open(os.path.join(out, "masks", f"{i}.png"))) > 127)
                 for i in df["image_id"]]
        sets.append((f"synthetic {len(pairs)} sections 800x600", pairs))
    return sets


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--synthetic", type=int, default=4, help="synthetic sections (0 = none)")
    args = ap.parse_args()
    cfgs = {m: S.MaskConfig(method=m) for m in METHODS}
    print("| image set | perturbation | method | worst IoU vs unperturbed | worst IoU vs true "
          "| tissue fraction |")
    print("|---|---|---|---|---|---|")
    worst = {m: 1.0 for m in METHODS}
    t0 = time.time()
    for name, pairs in image_sets(args.synthetic):
        base = {m: [S.classical_mask(rgb, cfg=cfgs[m]) for rgb, _ in pairs] for m in METHODS}
        for m in METHODS:
            truth = [iou(b, t) for b, (_, t) in zip(base[m], pairs, strict=True) if t is not None]
            frac = np.mean([b.mean() for b in base[m]])
            print(f"| {name} | none | {m} | 1.00 | {min(truth):.3f} | {frac:.3f} |"
                  if truth else f"| {name} | none | {m} | 1.00 | - | {frac:.3f} |")
        for pname, fn in PERTURBATIONS:
            imgs = [fn(rgb) for rgb, _ in pairs]
            for m in METHODS:
                masks = [S.classical_mask(x, cfg=cfgs[m]) for x in imgs]
                vs_base = min(iou(a, b) for a, b in zip(masks, base[m], strict=True))
                vs_true = [iou(a, t) for a, (_, t) in zip(masks, pairs, strict=True)
                           if t is not None]
                worst[m] = min(worst[m], vs_base)
                true_txt = f"{min(vs_true):.3f}" if vs_true else "-"
                print(f"| {name} | {pname} | {m} | {vs_base:.3f} | {true_txt} | "
                      f"{np.mean([x.mean() for x in masks]):.3f} |", flush=True)
    print("# worst IoU vs unperturbed over all sets: "
          + ", ".join(f"{m} {worst[m]:.3f}" for m in METHODS)
          + f" ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()

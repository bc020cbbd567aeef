"""U-Net tissue segmenter (bin/train --model=unet) vs the classical segmenter.

Trains the U-Net of configs/unet_segmenter.cfg through the shared trainer on N
synthetic sections with their true masks, then scores both segmenters on held-out
synthetic sections (IoU against the true masks, at full resolution) and times them.
Prints the training wall time, mean/min IoU of each segmenter, and the ratios
U-Net / classical (the baseline measured in the same script).

Usage (from the repository root; about 2-3 minutes on 2 CPU cores):
  .venv/bin/python bench/bench_unet_segmenter.py [--n_train 40] [--n_test 20] [--steps 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n_train", type=int, default=40, help="training pairs (paper: 40)")
    parser.add_argument("--n_test", type=int, default=20, help="held-out sections scored")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--size", type=int, default=384, help="side of the synthetic sections")
    parser.add_argument("--work", default="", help="work directory (default: a temp dir)")
    args = parser.parse_args()

    import numpy as np

    from ish_tf import cli
    from ish_tf.cli import train as train_cli
    from ish_tf.data import manifest as mf
    from ish_tf.data.segment import UNetSegmenter, classical_mask
    from ish_tf.data.synthetic import SynthConfig, generate_dataset
    from ish_tf.families import make_task
    from ish_tf.families.unet.task import score_segmenter
    from ish_tf.train.trainer import train

    work = args.work or tempfile.mkdtemp(prefix="bench_unet_")
    data = os.path.join(work, "synth")
    n_total = args.n_train + args.n_test
    # 2 images per (gene, donor), 3 donors per gene: 6 images per gene.
    n_genes = -(-n_total // 6)
    df = generate_dataset(SynthConfig(out_dir=data, n_genes=n_genes, n_donors=4, donors_per_gene=3,
                                      images_per_gene_donor=2, height=args.size, width=args.size,
                                      seed=11))
    df = df.sort_values("image_id").reset_index(drop=True)
    train_df, test_df = df.iloc[:args.n_train], df.iloc[args.n_train:n_total]
    train_manifest = os.path.join(data, "manifest_unet_train.csv")
    mf.write_manifest(train_df, train_manifest)

    run_dir = os.path.join(work, "run")
    fv = cli.parse("train", [f"--flagfile={os.path.join(ROOT, 'configs', 'unet_segmenter.cfg')}",
                             f"--unet_mask_manifest={train_manifest}", f"--run_dir={run_dir}",
                             f"--steps={args.steps}", f"--decay_start={args.steps * 5 // 6}",
                             "--unet_val_fraction=0"])
    model_cfg, train_cfg = train_cli.model_config(fv), train_cli.train_config(fv)
    t0 = time.monotonic()
    result = train(make_task(model_cfg, train_cfg), train_cfg)
    train_s = time.monotonic() - t0

    pairs = [(mf.image_path(train_manifest, p), os.path.join(data, "masks", f"{i}.png"))
             for p, i in zip(test_df["path"], test_df["image_id"], strict=True)]
    unet = UNetSegmenter.load(result.model_path)
    unet(np.zeros((args.size, args.size, 3), np.uint8) + 240)  # warm up predict's tracing
    t0 = time.monotonic()
    u = score_segmenter(unet, pairs)
    unet_s = (time.monotonic() - t0) / len(pairs)
    t0 = time.monotonic()
    c = score_segmenter(classical_mask, pairs)
    classical_s = (time.monotonic() - t0) / len(pairs)
    # Predicting "all tissue" scores IoU = tissue fraction; "all slide" scores 0.
    trivial = float(u["truth_fraction"].mean())

    print(f"U-Net: {args.n_train} pairs, {result.step} steps, input {model_cfg.input_size}, "
          f"batch {model_cfg.family.batch_size}: train {train_s:.1f} s, final loss "
          f"{result.loss:.4f}")
    print(f"held-out sections: {len(pairs)} of {args.size}x{args.size}")
    print(f"  classical IoU mean {c['iou'].mean():.4f} min {c['iou'].min():.4f}  "
          f"{classical_s * 1e3:.1f} ms/image")
    print(f"  U-Net     IoU mean {u['iou'].mean():.4f} min {u['iou'].min():.4f}  "
          f"{unet_s * 1e3:.1f} ms/image")
    print(f"  trivial (all tissue) IoU mean {trivial:.4f}")
    print(f"ratio U-Net/classical: IoU {u['iou'].mean() / c['iou'].mean():.4f}, "
          f"time per image {unet_s / classical_s:.2f}x")
    print(f"work dir: {work}")


if __name__ == "__main__":
    main()

"""CDAE quickstart benchmark: throughput, reconstruction error over steps, and the synthetic check.

Runs, in a work directory (resumable: existing outputs are reused):
  1. bin/synth --flagfile=configs/synth_quickstart.cfg (60 genes in 8 GO-like groups);
  2. whole-section records at 64x64 (bin/extract --whole_images);
  3. bin/train --flagfile=configs/cdae_quickstart.cfg (or --config);
  4. export (SavedModel, family cdae) and bin/embed's embed_records -> gene codes;
  5. baselines: pixel PCA to the code size, the untrained encoder;
  6. GO-group prediction (ish_tf.evaluate.annotations, 5-fold CV logistic regression)
     of the three gene tables on the same genes.
Prints images/s and the reconstruction error (mse, [0, 1] units) over steps from
RUN/metrics.csv, the AUC table, and the ratios CDAE / PCA and CDAE / untrained; plus
a timed comparison of train-step throughput with --unpool=switches vs nearest (the
baseline measured in the same script).

Usage:
  .venv/bin/python bench/bench_cdae.py [--work=/tmp/ish_cdae_bench] [--steps=600]
      [--config=configs/cdae_quickstart.cfg] [--run=NAME] [--extra="--cdae_code_size=16 ..."]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, ".venv", "bin", "python")


def sh(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=ROOT, check=True)


def throughput(unpool: str, size: int = 64, batch: int = 32, steps: int = 30) -> float:
    """Images/s of the CDAE train step (forward, loss, backward, Adam) on random images."""
    import keras
    import tensorflow as tf

    from ish_tf.models import ModelConfig
    from ish_tf.models.cdae import build_cdae

    cfg = ModelConfig(model="cdae", input_size=size, seed=0,
                      options={"depth": 3, "filters": [16, 32, 32], "code_size": 64,
                               "unpool": unpool})
    model = build_cdae(cfg)
    opt = keras.optimizers.Adam(1e-3)
    x = tf.random.uniform((batch, size, size, 1), 0, 255, seed=0)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            _, recon = model(x, training=True)
            loss = tf.reduce_mean(tf.square(recon - (1.0 - x / 255.0)))
        opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss

    for _ in range(3):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/ish_cdae_bench")
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "cdae_quickstart.cfg"))
    ap.add_argument("--steps", type=int, default=0, help="override --steps (0 = the config's)")
    ap.add_argument("--size", type=int, default=64, help="whole-section size")
    ap.add_argument("--extra", default="", help="extra bin/train flags")
    ap.add_argument("--run", default="run", help="run directory name under --work")
    ap.add_argument("--skip_throughput", action="store_true")
    args = ap.parse_args()
    work = args.work
    synth, records = os.path.join(work, "synth"), os.path.join(work, f"whole{args.size}")
    run = os.path.join(work, args.run)
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(synth, "manifest.csv")):
        sh([os.path.join(ROOT, "bin", "synth"),
            f"--flagfile={os.path.join(ROOT, 'configs', 'synth_quickstart.cfg')}", f"--out={synth}"])
    t = time.perf_counter()
    sh([os.path.join(ROOT, "bin", "extract"), f"--manifest={synth}/manifest.csv",
        f"--out={records}", "--whole_images", f"--whole_size={args.size}", "--format=png",
        "--num_shards=4", "--workers=2"])
    print(f"whole-section extraction: {time.perf_counter() - t:.1f} s")
    train = [os.path.join(ROOT, "bin", "train"), f"--flagfile={args.config}",
             f"--records_dir={records}", f"--run_dir={run}", f"--input_size={args.size}"]
    if args.steps:
        train.append(f"--steps={args.steps}")
    train += shlex.split(args.extra)
    t = time.perf_counter()
    sh(train)
    print(f"training wall time: {time.perf_counter() - t:.1f} s")

    import numpy as np
    import pandas as pd

    metrics = pd.read_csv(os.path.join(run, "metrics.csv"))
    print("\nreconstruction error over steps (mse in [0, 1] units; images/s per interval):")
    print(metrics[["step", "loss", "mse", "mae", "images_per_sec"]].to_string(index=False))
    print(f"median images/s: {metrics['images_per_sec'].iloc[1:].median():.1f}")

    import ish_tf.models.cdae  # noqa: F401 - registers the custom layers before loading
    from ish_tf.data.embeddings import read_embedding_table
    from ish_tf.embed import EmbedConfig, embed_records
    from ish_tf.evaluate import annotations as ann
    from ish_tf.evaluate.go import load_go
    from ish_tf.export.saved_model import export_run
    from ish_tf.models import load_model_config
    from ish_tf.models.cdae import cdae_options
    from ish_tf.train.task_cdae import pixel_pca, untrained_encoder

    export = export_run(run, os.path.join(work, "export_" + args.run), overwrite=True, version=1)
    emb_dir = os.path.join(work, "embeddings_" + args.run)
    embed_records(EmbedConfig(saved_model=export, records_dir=records, out_dir=emb_dir).validate())
    config = load_model_config(os.path.join(run, "model_config.json"))
    opts = cdae_options(config)
    tables = {"cdae": read_embedding_table(os.path.join(emb_dir, "gene_embeddings.csv")),
              "pixels_pca": pixel_pca(records, opts["code_size"], opts["height"], opts["width"],
                                      invert=opts["invert"])[1],
              "untrained_encoder": untrained_encoder(config, records)[1]}
    go = load_go(os.path.join(synth, "go.gaf"))
    scoring = ann.ScoringConfig(n_splits=5, seed=0, min_genes=3, size_bounds={"go": (3, 500)},
                                n_jobs=2)
    results, _, _ = ann.evaluate_many(tables, [go], scoring)
    summary = ann.summarize(results)
    summary = summary[summary["category"] == "all"]
    print("\nGO-like group prediction on the synthetic genes (5-fold CV, per-term AUC):")
    print(summary[["embedding", "n_groups", "mean_auc", "median_auc", "mean_auc_pr",
                   "n_significant"]].to_string(index=False))
    auc = dict(zip(summary["embedding"], summary["mean_auc"], strict=True))
    print(f"ratio mean AUC cdae / pixels_pca: {auc['cdae'] / auc['pixels_pca']:.3f}")
    print(f"ratio mean AUC cdae / untrained_encoder: {auc['cdae'] / auc['untrained_encoder']:.3f}")
    per_term = results.pivot_table(index="annotation", columns="embedding", values="auc")
    print(per_term.round(3).to_string())
    print(f"cdae wins on {int(np.sum(per_term['cdae'] > per_term['pixels_pca']))} of "
          f"{len(per_term)} terms against pixels_pca")

    if not args.skip_throughput:
        base = throughput("nearest", args.size)
        sw = throughput("switches", args.size)
        print(f"\ntrain-step throughput at {args.size}x{args.size}, batch 32: nearest "
              f"{base:.1f} img/s, switches {sw:.1f} img/s, ratio switches/nearest {sw / base:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cell identity codes against PCA / NMF / KernelPCA and SVMs, over seeds
(`bin/quickstart --family=cic`, each seed a new split and initialisation).

  python bench/bench_cic.py --seeds=0,1,2 \\
      --expression=../shared/data/expression/pbmc68k_reduced.h5ad --label_column=bulk_labels --use_raw
  python bench/bench_cic.py --seeds=0,1,2 --workdir=/tmp/cic_bench --reuse   # tables only

Prints markdown tables (mean and range over the seeds) of held-out reconstruction and
cell-type accuracy, with the training-mean, majority-class and chance figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _fmt(values, digits=3) -> str:
    v = np.asarray(values, float)
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ({v.min():.{digits}f}-{v.max():.{digits}f})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", default="/tmp/cic_bench")
    p.add_argument("--expression", default="")
    p.add_argument("--label_column", default="")
    p.add_argument("--use_raw", action="store_true")
    p.add_argument("--reuse", action="store_true", help="read the seeds' summary.json only")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    summaries = []
    for seed in seeds:
        workdir = os.path.join(a.workdir, f"seed{seed}")
        if not a.reuse:
            from ish_tf.families.cic.quickstart import run_quickstart

            run_quickstart(os.path.join(workdir, "cic"), root=ROOT, seed=seed,
                           expression=a.expression, label_column=a.label_column,
                           use_raw=a.use_raw, log=lambda s: None)
        with open(os.path.join(workdir, "cic", "summary.json"), encoding="utf-8") as f:
            summaries.append(json.load(f))
    s0 = summaries[0]
    print(f"{s0['data']}: {s0['n_train']} train / {s0['n_test']} test profiles, "
          f"{s0['n_genes']} genes, codes of {s0['code_size']}; seeds {seeds}\n")
    print("| method | MSE | Pearson | Spearman | own-profile rank-1 |")
    print("|---|---|---|---|---|")
    for m in s0["reconstruction"]:
        rows = [s["reconstruction"][m] for s in summaries]
        print(f"| {m} | " + " | ".join(_fmt([r[k] for r in rows]) for k in
                                       ("mse", "pearson", "spearman", "own_rank1")) + " |")
    chance = [s["reconstruction_chance"]["own_rank1"] for s in summaries]
    print(f"\nOwn-profile rank-1 by chance: {_fmt(chance, 4)}.\n")
    print("| features -> classifier | accuracy | errors |")
    print("|---|---|---|")
    for m in s0["classification"]:
        acc = [s["classification"][m] for s in summaries]
        err = [s["classification_errors"][m] for s in summaries]
        print(f"| {m} | {_fmt(acc)} | {', '.join(err)} |")
    for m in s0["classification_baselines"]:
        print(f"| {m} | {_fmt([s['classification_baselines'][m] for s in summaries])} | |")
    for s in summaries:
        u = s.get("unseen") or []
        rec = {(r["codes"], r["profiles"]): r for r in u}
        if rec:
            held = rec[("cic", "unseen (held-out labels)")]["labels"]
            print(f"\nunseen ({held}): " + "; ".join(
                f"{c}: MSE seen {rec[(c, 'seen (validation)')]['mse']:.3f} vs unseen "
                f"{rec[(c, 'unseen (held-out labels)')]['mse']:.3f}, CV recall of the unseen "
                f"type(s) {rec[(c, 'unseen placement')]['unseen_recall_cv']:.3f}"
                for c in ("cic", "pca")))


if __name__ == "__main__":
    main()

"""Mean vs attention pooling on a synthetic cohort with a localised donor-level change.

Renders `ish_tf.data.synthetic_cohort` (cases and controls; in cases, the sections of
the affected genes gain expression in one layer within ~4% of the tissue), embeds every
patch with an untrained (random-weights) small_cnn backbone, writes the patch table in
bin/embed's schema, and scores the donor label per gene with
`ish_tf.evaluate.attention_mil.compare_poolings` (mean vs attention on the same 5 folds),
as `bin/evaluate --pooling=attention --pooling_level=donor` does. Then checks whether the
highest-attention patches of the case sections of affected genes are the changed ones
(precision at k against the generator's truth: a patch with >= 10% changed pixels),
beside chance (the fraction of changed patches in those bags).

Unaffected genes are the negative control: both poolings should sit near AUC 0.5.

    .venv/bin/python bench/bench_attention_mil.py [--donors 40] [--genes 4] [--affected 2]
        [--fraction 0.04] [--seeds 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ish_tf.data.embeddings import EmbeddingTable, read_embedding_table, write_embedding_table  # noqa: E402
from ish_tf.data.synthetic_cohort import CohortConfig, make_cohort, patch_pixels  # noqa: E402
from ish_tf.evaluate import attention_mil as am  # noqa: E402

CHANGED = 0.10  # a patch is "changed" when at least this fraction of its pixels changed


def embed_patches(pixels: np.ndarray, seed: int) -> np.ndarray:
    import keras

    from ish_tf.models.backbones import small_cnn

    keras.utils.set_random_seed(seed)
    model = small_cnn(pixels.shape[1], widths=(16, 32, 64))
    return model.predict(pixels.astype(np.float32), batch_size=256, verbose=0)


def run(args, seed: int, out: str) -> dict:
    cfg = CohortConfig(n_donors=args.donors, n_genes=args.genes, n_affected=args.affected,
                       region_fraction=args.fraction, seed=seed)
    t0 = time.time()
    cohort = make_cohort(cfg)
    emb = embed_patches(patch_pixels(cohort, cfg.patch), seed)
    keys = cohort.patches[["image_id", "patch_index", "x", "y", "gene_symbol", "donor_id"]]
    path = os.path.join(out, f"patch_embeddings_seed{seed}.csv")
    write_embedding_table(path, EmbeddingTable(keys, emb))
    table = read_embedding_table(path)
    from ish_tf.evaluate.diagnosis import donor_labels

    labels = donor_labels(cohort.manifest, "diagnosis", "schizophrenia", "control")
    t1 = time.time()
    scores, attention = am.compare_poolings(table, "donor", "diagnosis", "schizophrenia",
                                            "control", labels=labels,
                                            config=am.MILConfig(seed=seed))
    t2 = time.time()
    affected = set(cohort.manifest.loc[cohort.manifest["affected"], "gene_symbol"])
    scores["affected"] = scores["scope"].isin(affected)
    truth = attention.merge(cohort.patches[["image_id", "patch_index", "changed_fraction"]],
                            on=["image_id", "patch_index"], how="left")
    check = truth[truth["gene_symbol"].isin(affected) & (truth["label"] == 1)].copy()
    check["bag"] = check["image_id"]
    precision = {k: am.precision_at_k(check, check["changed_fraction"] >= CHANGED, k)
                 for k in (1, 3, 5)}
    return {"scores": scores, "precision": precision, "render_embed_s": t1 - t0,
            "cv_s": t2 - t1, "n_patches": len(table), "dim": table.dim,
            "changed_per_bag": float((check["changed_fraction"] >= CHANGED)
                                     .groupby(check["bag"]).sum().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--donors", type=int, default=40)
    parser.add_argument("--genes", type=int, default=4)
    parser.add_argument("--affected", type=int, default=2)
    parser.add_argument("--fraction", type=float, default=0.04)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_mil_")
    all_scores, precisions = [], []
    for seed in (int(s) for s in args.seeds.split(",")):
        r = run(args, seed, out)
        s = r["scores"].assign(seed=seed)
        all_scores.append(s)
        precisions.append(r["precision"])
        print(f"seed {seed}: {r['n_patches']} patches (D={r['dim']}), render+embed "
              f"{r['render_embed_s']:.1f}s, cross-validation {r['cv_s']:.1f}s; "
              f"{r['changed_per_bag']:.1f} changed patches per case bag of affected genes")
        print(s[["scope", "affected", "pooling", "n_bags", "auc", "auc_pr", "max_p"]]
              .to_string(index=False))
        for k, (p, chance) in r["precision"].items():
            print(f"  precision@{k} of top-attention patches (case bags, affected genes): "
                  f"{p:.3f} (chance {chance:.3f})")
    scores = pd.concat(all_scores)
    summary = scores.groupby(["affected", "pooling"])["auc"].agg(["mean", "std", "count"])
    print("\nmean AUC over genes and seeds (affected genes: the condition changes them):")
    print(summary.to_string())
    for k in (1, 3, 5):
        p = np.mean([pr[k][0] for pr in precisions])
        c = np.mean([pr[k][1] for pr in precisions])
        print(f"precision@{k}: {p:.3f} (chance {c:.3f})")
    print(f"tables in {out}")


if __name__ == "__main__":
    main()

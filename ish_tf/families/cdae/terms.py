"""GO-like terms for the supervised CDAE: term groups, label matrices, per-term AUCs."""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from ish_tf.families.cdae.data import to_gray


def load_term_groups(gaf: str = "", annotations: str = "") -> dict[str, set[str]]:
    """Term -> upper-case gene symbols, from a GAF or a categorical annotation CSV.

    Args:
      gaf: GAF 2.x file (terms are GO ids).
      annotations: CSV of gene_symbol + categorical columns (terms are "column=value").

    Returns:
      Term -> set of members' gene symbols (upper case); the key "" holds every
      annotated gene (the evaluation universe).

    Raises:
      ValueError: neither or both sources given.
      AnnotationError: unreadable file.
    """
    from ish_tf.evaluate import annotations as ann_lib

    if bool(gaf) == bool(annotations):
        raise ValueError("cdae_supervised: give exactly one of --cdae_gaf and --cdae_annotations")
    if gaf:
        from ish_tf.evaluate.go import load_go

        ann = load_go(gaf)
    else:
        ann = ann_lib.read_annotation_table(annotations)
    if "gene_symbol" not in ann.genes.columns:
        raise ValueError(f"{ann.source}: needs gene symbols to join to the records")
    symbols = ann_lib.normalize_symbols(ann.genes["gene_symbol"]).to_numpy()
    groups: dict[str, set[str]] = {"": {str(s) for s in symbols if isinstance(s, str)}}
    for k, row in enumerate(ann.groups.itertuples(index=False)):
        name = row.annotation if gaf else f"{row.category}={row.annotation}"
        groups[name] = {str(s) for s in symbols[ann.members[k]] if isinstance(s, str)}
    return groups


def term_matrix(records_dir: str, groups: dict[str, set[str]], terms: Sequence[str] | None = None,
                min_genes: int = 15, max_genes: int = 500) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Selects terms by their number of TRAINING genes and builds the label matrix.

    Args:
      records_dir: records with a dataset info (gene vocabulary and splits).
      groups: from `load_term_groups`.
      terms: use exactly these terms (a saved run) instead of selecting.
      min_genes, max_genes: inclusive bounds on a term's training genes.

    Returns:
      (terms, float32 (G, T) labels per gene_index, bool (G,) annotated genes).

    Raises:
      ValueError: no dataset info, or no term passes the bounds.
    """
    from ish_tf.data import shards

    info = shards.load_dataset_info(records_dir)
    if info is None:
        raise ValueError(f"{records_dir}: no dataset info in index.json; run bin/extract first")
    size = max(g.gene_index for g in info.genes) + 1
    symbols = np.array([""] * size, dtype=object)
    splits = np.array([""] * size, dtype=object)
    for g in info.genes:
        symbols[g.gene_index] = g.gene_symbol.strip().upper()
        splits[g.gene_index] = g.split
    if terms is None:
        train = {s for s, sp in zip(symbols, splits, strict=True) if sp == "train"}
        terms = sorted(t for t, members in groups.items()
                       if t and min_genes <= len(members & train) <= max_genes)
        if not terms:
            sizes = sorted((len(m & train) for t, m in groups.items() if t), reverse=True)[:5]
            raise ValueError(f"no annotation term has {min_genes}..{max_genes} training genes in "
                             f"{records_dir} (largest: {sizes}); adjust --cdae_term_min_genes/"
                             "--cdae_term_max_genes")
    matrix = np.zeros((size, len(terms)), dtype=np.float32)
    for j, t in enumerate(terms):
        members = groups.get(t, set())
        matrix[:, j] = [s in members for s in symbols]
    annotated = np.array([s in groups.get("", set()) for s in symbols], dtype=bool)
    return list(terms), matrix, annotated


def predict_records(model: keras.Model, records_dir: str, split: str | Sequence[str],
                    batch_size: int = 64, output: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Runs one model output over every record of the split(s), in record order.

    Args:
      model: a CDAE-family Keras model (or its encoder).
      records_dir: whole-section records.
      split: a split name or several.
      batch_size: images per call.
      output: index of the output to keep when the model has several.

    Returns:
      (keys DataFrame: image_id, gene_symbol, entrez_id, donor_id, split; float32 (N, D)).
    """
    from ish_tf.data.pipeline import patch_dataset

    height, width = int(model.inputs[0].shape[1]), int(model.inputs[0].shape[2])
    keys, values = [], []
    for sp in [split] if isinstance(split, str) else list(split):
        ds = patch_dataset(records_dir, sp, batch_size=batch_size, training=False, with_keys=True)
        for images, feats in ds:
            images = to_gray(images)
            if tuple(images.shape[1:3]) != (height, width):
                images = tf.image.resize(images, (height, width), antialias=True)
            out = model(images, training=False)
            out = out[output] if isinstance(out, (list, tuple)) else out
            values.append(np.asarray(out, dtype=np.float32).reshape(len(images), -1))
            keys.append(pd.DataFrame({
                "image_id": feats["image_id"].numpy(),
                "gene_symbol": [s.decode() for s in feats["gene_symbol"].numpy()],
                "entrez_id": feats["entrez_id"].numpy(),
                "donor_id": [s.decode() for s in feats["donor_id"].numpy()],
                "gene_index": feats["gene_index"].numpy(), "split": sp}))
    if not values:
        return pd.DataFrame(columns=["image_id", "gene_symbol"]), np.zeros((0, 0), np.float32)
    return pd.concat(keys, ignore_index=True), np.concatenate(values)


def term_auc(model: keras.Model, records_dir: str, terms: Sequence[str],
             groups: dict[str, set[str]], split: str = "test",
             batch_size: int = 64) -> pd.DataFrame:
    """Per-term AUC of a supervised CDAE on the annotated genes of a held-out split.

    Image probabilities are averaged per gene; a term is scored when the split has at
    least one positive and one negative annotated gene.

    Returns:
      Columns term, n_genes, n_positive, auc (NaN when not scorable); sorted by term.
    """
    from sklearn.metrics import roc_auc_score

    keys, probs = predict_records(model, records_dir, split, batch_size, output=0)
    _, matrix, annotated = term_matrix(records_dir, groups, terms)
    frame = pd.DataFrame(probs).assign(gene_index=keys["gene_index"].to_numpy())
    per_gene = frame.groupby("gene_index").mean()
    idx = per_gene.index.to_numpy()
    keep = annotated[idx]
    rows = []
    for j, t in enumerate(terms):
        y = matrix[idx[keep], j]
        s = per_gene.to_numpy()[keep, j]
        ok = 0 < y.sum() < len(y)
        rows.append({"term": t, "n_genes": int(len(y)), "n_positive": int(y.sum()),
                     "auc": float(roc_auc_score(y, s)) if ok else float("nan")})
    return pd.DataFrame(rows, columns=["term", "n_genes", "n_positive", "auc"])


def heldout_lr_auc(x: np.ndarray, labels: np.ndarray, fit: np.ndarray, test: np.ndarray
                   ) -> np.ndarray:
    """Per-label AUC of logistic regressions fit on some rows and scored on others.

    The model of `bin/evaluate --task=annotations` (`annotations.fit_and_score`: features
    z-scored with the fit rows' mean and deviation, one unpenalised logistic regression
    per label).

    Args:
      x: (n, D) features.
      labels: (n, T) in {0, 1}.
      fit, test: (n,) bool masks of the rows to fit on and to score.

    Returns:
      float64 (T,) AUCs; NaN where the fit or the test rows lack a positive or a negative.
    """
    from sklearn.metrics import roc_auc_score

    from ish_tf.evaluate.annotations import fit_and_score

    aucs = np.full(labels.shape[1], np.nan)
    for j in range(labels.shape[1]):
        y_fit, y_test = labels[fit, j], labels[test, j]
        if 0 < y_fit.sum() < len(y_fit) and 0 < y_test.sum() < len(y_test):
            scores, _ = fit_and_score(x[fit], y_fit, x[test])
            aucs[j] = roc_auc_score(y_test, scores)
    return aucs


def codes_term_auc(encoder: keras.Model, records_dir: str, terms: Sequence[str],
                   groups: dict[str, set[str]], split: str = "test",
                   fit_splits: Sequence[str] = ("train", "validation"),
                   batch_size: int = 64) -> pd.DataFrame:
    """Per-term AUC of codes + logistic regression on the same held-out genes as `term_auc`.

    The two-stage alternative to the supervised model: gene codes (image codes averaged
    per gene) of the annotated `fit_splits` genes fit `heldout_lr_auc`'s regressions,
    which score the annotated `split` genes.

    Returns:
      Columns term, n_genes, n_positive, auc (as `term_auc`).
    """
    keys, codes = predict_records(encoder, records_dir, [*fit_splits, split], batch_size)
    _, matrix, annotated = term_matrix(records_dir, groups, terms)
    frame = pd.DataFrame(codes).assign(gene_index=keys["gene_index"].to_numpy(),
                                       held_out=(keys["split"] == split).to_numpy())
    per_gene = frame.groupby("gene_index").mean()
    idx = per_gene.index.to_numpy()
    held_out = per_gene.pop("held_out").to_numpy() > 0.5
    keep = annotated[idx]
    labels = matrix[idx]
    test = keep & held_out
    aucs = heldout_lr_auc(per_gene.to_numpy(), labels, keep & ~held_out, test)
    return pd.DataFrame({"term": list(terms), "n_genes": int(test.sum()),
                         "n_positive": labels[test].sum(axis=0).astype(int), "auc": aucs},
                        columns=["term", "n_genes", "n_positive", "auc"])



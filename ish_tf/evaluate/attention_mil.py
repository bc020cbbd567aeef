"""Mean vs attention pooling of patch embeddings for a bag-level target, on the same folds.

The evaluation averages patch embeddings wherever it needs one vector per image, per
gene in a donor or per gene (`ish_tf.data.embeddings.aggregate`): the paper's choice,
which "might be less sensitive to larger spatial signals and dilute localized
abnormalities". This module scores the alternative, attention-MIL pooling
(`ish_tf.models.mil`, Ilse et al. 2018), against the mean on the *same* stratified
folds, for a binary bag-level target (a diagnosis, an annotation, a donor-level label):

* bags: the patch rows of a patch-level table (`bin/embed`'s patch_embeddings.csv)
  grouped by the level's keys (image: image_id; donor: gene_symbol × donor_id; gene:
  gene_symbol), at most `max_patches` (50) per bag (a seeded subset of larger bags,
  counted), padded with a mask;
* mean pooling: the masked mean of each bag, scored with
  `ish_tf.evaluate.annotations.cross_validate_binary` (the mean-pooled path itself:
  unpenalised logistic regression, features standardised inside each fold);
* attention pooling: the gated-attention model trained on the training folds' bags
  (instances standardised with the training patches' mean and deviation), scored on the
  held-out bags; each bag's attention weights come from the fold where it was held out.

Both use `StratifiedKFold(n_splits, shuffle=True, random_state=seed)` on the same label
vector, so they see identical folds. With `per_gene` (donor level, like the diagnosis
task), each gene's donors form their own cross-validation, as `ish_tf.evaluate.diagnosis`
does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ish_tf.data.embeddings import LEVEL_KEYS, EmbeddingTable, EmbeddingTableError

POOLINGS = ("mean", "attention")
POOLING_LEVELS = ("image", "donor", "gene")
MAX_BAG = 50


@dataclasses.dataclass
class MILConfig:
    """Settings of the attention-MIL scorer.

    Attributes:
      max_patches: N, patches per bag (larger bags: a seeded subset).
      hidden: per-patch projection width (0: pool the standardised embeddings).
      attention_dim: attention network width.
      dropout: dropout on projected patches while training.
      epochs: passes over the training bags per fold.
      batch_size: bags per step.
      learning_rate: Adam's learning rate.
      weight_decay: AdamW weight decay.
      gated: gated attention (the paper's) or plain.
      seed: seeds the subsets, the folds and the initialisation.
      n_splits: cross-validation folds.
    """

    max_patches: int = MAX_BAG
    hidden: int = 32
    attention_dim: int = 32
    dropout: float = 0.1
    epochs: int = 60
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 1e-3
    gated: bool = True
    seed: int = 0
    n_splits: int = 5

    def validate(self) -> MILConfig:
        if not 1 <= self.max_patches <= MAX_BAG:
            raise ValueError(f"max_patches must be in 1..{MAX_BAG}, got {self.max_patches}")
        if self.epochs < 1 or self.batch_size < 1 or self.n_splits < 2:
            raise ValueError("epochs and batch_size must be >= 1 and n_splits >= 2")
        return self


@dataclasses.dataclass
class Bags:
    """Patch embeddings grouped into padded bags.

    Attributes:
      keys: (B,) rows of the level's key columns, one per bag (plus n_patches, n_total).
      x: (B, N, D) float32 embeddings, zeros where padded.
      mask: (B, N) bool, True for real patches.
      rows: (B, N) int64 row of each patch in the patch table, -1 where padded.
    """

    keys: pd.DataFrame
    x: np.ndarray
    mask: np.ndarray
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def mean(self) -> np.ndarray:
        """(B, D) masked means: the mean-pooled embedding of each bag."""
        n = np.maximum(self.mask.sum(1, keepdims=True), 1)
        return (self.x * self.mask[..., None]).sum(1) / n

    def subset(self, idx) -> Bags:
        idx = np.asarray(idx)
        return Bags(self.keys.iloc[idx].reset_index(drop=True), self.x[idx], self.mask[idx],
                    self.rows[idx])


def make_bags(table: EmbeddingTable, level: str, max_patches: int = MAX_BAG,
              seed: int = 0) -> Bags:
    """Groups a patch-level table into bags at `level` (image, donor or gene).

    Raises:
      EmbeddingTableError: not a patch-level table, or a key column of the level missing.
    """
    if level not in POOLING_LEVELS:
        raise ValueError(f"pooling level must be one of {', '.join(POOLING_LEVELS)}, got "
                         f"{level!r}")
    by = list(LEVEL_KEYS[level])
    source = table.source or "<table>"
    if "patch_index" not in table.keys.columns:
        raise EmbeddingTableError(f"{source}: attention pooling needs a patch-level table "
                                  "(patch_index column; bin/embed's patch_embeddings.csv)")
    missing = [c for c in by if c not in table.keys.columns]
    if missing:
        raise EmbeddingTableError(f"{source}: pooling at level {level} needs column(s) "
                                  f"{missing}")
    keys = table.keys.reset_index(drop=True)
    codes = keys.groupby(by, sort=True, dropna=False).ngroup().to_numpy()
    n_bags = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    order = np.argsort(codes, kind="stable")
    starts = np.searchsorted(codes[order], np.arange(n_bags + 1))
    x = np.zeros((n_bags, max_patches, table.dim), np.float32)
    mask = np.zeros((n_bags, max_patches), bool)
    rows = np.full((n_bags, max_patches), -1, np.int64)
    totals = np.diff(starts)
    for b in range(n_bags):
        members = order[starts[b]:starts[b + 1]]
        if len(members) > max_patches:
            members = np.sort(rng.choice(members, max_patches, replace=False))
        x[b, :len(members)] = table.values[members]
        mask[b, :len(members)] = True
        rows[b, :len(members)] = members
    first = keys.groupby(codes, sort=True).first()
    constant = [c for c in keys.columns if c in by
                or (keys.groupby(codes)[c].nunique(dropna=False) <= 1).all()]
    bag_keys = first[[c for c in constant if c != "patch_index"]].reset_index(drop=True)
    bag_keys["n_patches"] = mask.sum(1)
    bag_keys["n_total"] = totals
    return Bags(bag_keys, x, mask, rows)


def folds(y: np.ndarray, n_splits: int, seed: int):
    """The folds of `cross_validate_binary`: StratifiedKFold(shuffle, seed) on y."""
    from sklearn.model_selection import StratifiedKFold

    y = np.asarray(y).astype(np.int64)
    return list(StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
                .split(np.zeros((len(y), 1)), y))


def fit_attention(bags: Bags, y: np.ndarray, config: MILConfig):
    """Trains the attention model on bags; returns (predict(bags) -> (scores, weights))."""
    import keras
    import tensorflow as tf

    from ish_tf.models.mil import build_attention_mil

    valid = bags.x[bags.mask]
    mu = valid.mean(0)
    sd = valid.std(0) + 1e-6

    def prep(b: Bags) -> np.ndarray:
        return (((b.x - mu) / sd) * b.mask[..., None]).astype(np.float32)

    keras.utils.set_random_seed(config.seed)
    model = build_attention_mil(bags.x.shape[1], bags.x.shape[2], hidden=config.hidden,
                                attention_dim=config.attention_dim, dropout=config.dropout,
                                gated=config.gated, seed=config.seed)
    optimizer = keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay)
    x, m = tf.constant(prep(bags)), tf.constant(bags.mask)
    yt = tf.constant(np.asarray(y, np.float32)[:, None])
    n = len(bags)
    # Balanced classes: weights so each class counts half (small, skewed cohorts).
    pos = float(np.mean(y))
    w = np.where(np.asarray(y) == 1, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))
    wt = tf.constant(w.astype(np.float32))

    # All steps in one traced loop (one trace per fold, no Python per step); each epoch
    # is a fresh permutation cut into equal batches (the remainder waits for the next).
    bs = min(config.batch_size, n)
    rng = np.random.default_rng(config.seed)
    per_epoch = n // bs
    schedule = np.concatenate([rng.permutation(n)[:per_epoch * bs].reshape(per_epoch, bs)
                               for _ in range(config.epochs)])
    model([x[:1], m[:1]])  # build the variables (and the optimizer's) before tracing
    optimizer.build(model.trainable_variables)

    @tf.function
    def train(schedule):
        for i in tf.range(tf.shape(schedule)[0]):
            idx = schedule[i]
            with tf.GradientTape() as tape:
                logit, _ = model([tf.gather(x, idx), tf.gather(m, idx)], training=True)
                loss = tf.reduce_mean(tf.gather(wt, idx)[:, None]
                                      * tf.nn.sigmoid_cross_entropy_with_logits(
                                          labels=tf.gather(yt, idx), logits=logit))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))

    # One trace per fold is by design: TensorFlow's retracing warning would only alarm.
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel("ERROR")
    try:
        train(tf.constant(schedule, tf.int32))
    finally:
        logger.setLevel(level)

    def predict(b: Bags):
        logit, weights = model([tf.constant(prep(b)), tf.constant(b.mask)], training=False)
        return logit.numpy()[:, 0], weights.numpy()

    return predict


def cross_validate_pooling(bags: Bags, y, pooling: str, config: MILConfig,
                           standardize: bool = True, max_iter: int = 500,
                           solver: str = "newton-cg") -> tuple[dict, np.ndarray | None]:
    """Cross-validated scores of one pooling on bags with binary labels y.

    Returns:
      (metrics, attention): metrics as `cross_validate_binary` (auc, auc_pr, f1, max_p,
      converged); attention (B, N) held-out attention weights (None for mean pooling).

    Raises:
      ValueError: an unknown pooling, or a class with fewer members than folds.
    """
    from ish_tf.evaluate.annotations import cross_validate_binary

    y = np.asarray(y).astype(np.int64)
    if pooling == "mean":
        return cross_validate_binary(bags.mean(), y, n_splits=config.n_splits, seed=config.seed,
                                     standardize=standardize, max_iter=max_iter,
                                     solver=solver), None
    if pooling != "attention":
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    from scipy.stats import mannwhitneyu
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    n_pos = int(y.sum())
    if min(n_pos, len(y) - n_pos) < config.n_splits:
        raise ValueError(f"{n_pos} positives and {len(y) - n_pos} negatives: each needs >= "
                         f"{config.n_splits} folds")
    attention = np.zeros(bags.mask.shape, np.float32)
    aucs, aps, f1s, ps = [], [], [], []
    for train, test in folds(y, config.n_splits, config.seed):
        predict = fit_attention(bags.subset(train), y[train], config)
        score, weights = predict(bags.subset(test))
        attention[test] = weights
        yt = y[test]
        aucs.append(roc_auc_score(yt, score))
        aps.append(average_precision_score(yt, score))
        f1s.append(f1_score(yt, (score > 0).astype(np.int64), zero_division=0.0))
        ps.append(float(mannwhitneyu(score[yt == 1], score[yt == 0],
                                     alternative="greater").pvalue))
    return ({"auc": float(np.mean(aucs)), "auc_pr": float(np.mean(aps)),
             "f1": float(np.mean(f1s)), "max_p": float(np.max(ps)), "converged": 1.0},
            attention)


def bag_labels(bags: Bags, column: str, positive: str, negative: str = "",
               labels: pd.Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels of the bags from a key column, or from 0/1 labels per donor.

    Args:
      bags: the bags.
      column, positive, negative: a key column of the bags and its class values
        (case-insensitive; negative "" = every other non-empty value).
      labels: donor_id -> 0/1 (e.g. `ish_tf.evaluate.diagnosis.donor_labels`); used
        instead of the column when given.

    Returns:
      (keep, y): bags with a usable label, and their labels (1 = positive).

    Raises:
      EmbeddingTableError: the column is absent (and no labels given).
    """
    if labels is not None:
        if "donor_id" not in bags.keys.columns:
            raise EmbeddingTableError("donor labels need a donor_id column in the bags "
                                      "(pooling level image or donor)")
        values = bags.keys["donor_id"].map(labels)
        keep = values.notna().to_numpy()
        return keep, values.to_numpy()[keep].astype(np.int64)
    if column not in bags.keys.columns:
        raise EmbeddingTableError(f"pooling target {column!r} is neither a key column of the "
                                  f"bags ({', '.join(map(str, bags.keys.columns))}) nor given "
                                  "per donor (--manifest)")
    values = bags.keys[column]
    text = values.astype(str).str.strip().str.lower()
    pos = text == str(positive).strip().lower()
    neg = (text == str(negative).strip().lower()) if negative else ~pos
    keep = ((pos | neg) & values.notna()).to_numpy()
    return keep, pos.to_numpy()[keep].astype(np.int64)


def compare_poolings(table: EmbeddingTable, level: str, column: str, positive: str,
                     negative: str = "", *, labels: pd.Series | None = None,
                     per_gene: bool | None = None, poolings: Sequence[str] = POOLINGS,
                     config: MILConfig | None = None,
                     min_bags: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Mean vs attention pooling on the same folds (see module docstring).

    Args:
      table: patch-level embedding table.
      level: image, donor or gene.
      column, positive, negative: the bag-level target (a key column, or the donor label
        from `labels`).
      labels: donor_id -> 0/1 (e.g. the manifest's diagnosis through
        `ish_tf.evaluate.diagnosis.donor_labels`).
      per_gene: one cross-validation per gene (default: True at donor level).
      poolings: which to score ("mean" is the baseline; keep it).
      config: attention settings (and folds, seed).
      min_bags: scopes (genes) with fewer labelled bags are skipped.

    Returns:
      (scores, attention): scores has one row per scope (gene or "all") and pooling:
      scope, pooling, n_bags, n_positive, auc, auc_pr, f1, max_p, converged; attention
      has one row per patch of a scored bag: the patch table's keys, scope, label,
      attention (held-out weight), rank_in_bag (1 = highest weight).
    """
    config = (config or MILConfig()).validate()
    bags = make_bags(table, level, config.max_patches, config.seed)
    keep, y = bag_labels(bags, column, positive, negative, labels)
    bags = bags.subset(np.flatnonzero(keep))
    per_gene = (level == "donor") if per_gene is None else per_gene
    if per_gene and "gene_symbol" not in bags.keys.columns:
        raise EmbeddingTableError(f"{table.source}: per-gene pooling needs gene_symbol")
    scopes = (bags.keys["gene_symbol"].astype(str) if per_gene
              else pd.Series(["all"] * len(bags)))
    rows, att_frames = [], []
    for scope in sorted(scopes.unique()):
        idx = np.flatnonzero((scopes == scope).to_numpy())
        sub, ys = bags.subset(idx), y[idx]
        n_pos = int(ys.sum())
        if len(idx) < min_bags or min(n_pos, len(ys) - n_pos) < config.n_splits:
            continue
        for pooling in poolings:
            metrics, attention = cross_validate_pooling(sub, ys, pooling, config)
            rows.append({"scope": scope, "pooling": pooling, "n_bags": len(idx),
                         "n_positive": n_pos, **metrics})
            if attention is not None:
                att_frames.append(_attention_frame(table, sub, ys, attention, scope))
    scores = pd.DataFrame(rows, columns=["scope", "pooling", "n_bags", "n_positive", "auc",
                                         "auc_pr", "f1", "max_p", "converged"])
    attention = pd.concat(att_frames, ignore_index=True) if att_frames else pd.DataFrame()
    return scores, attention


def _attention_frame(table: EmbeddingTable, bags: Bags, y: np.ndarray, attention: np.ndarray,
                     scope: str) -> pd.DataFrame:
    b, k = np.nonzero(bags.mask)
    frame = table.keys.iloc[bags.rows[b, k]].reset_index(drop=True)
    frame["scope"] = scope
    frame["label"] = y[b]
    frame["attention"] = attention[b, k]
    # Rank of each patch's weight within its bag (1 = the most attended).
    ranks = np.zeros_like(attention, dtype=np.int64)
    order = np.argsort(-np.where(bags.mask, attention, -np.inf), axis=1, kind="stable")
    np.put_along_axis(ranks, order, np.arange(1, attention.shape[1] + 1)[None, :], axis=1)
    frame["rank_in_bag"] = ranks[b, k]
    return frame


def precision_at_k(attention: pd.DataFrame, truth: pd.Series, k: int) -> tuple[float, float]:
    """Precision at k of the top-attention patches of each bag against true changed patches.

    Args:
      attention: `compare_poolings`' attention table restricted to the bags to check
        (e.g. positive bags of affected genes), with a `bag` column naming each bag.
      truth: bool per row of `attention` (the patch is truly changed).
      k: patches per bag.

    Returns:
      (precision at k averaged over bags, chance: the mean fraction of changed patches).
    """
    frame = attention.assign(_truth=np.asarray(truth, bool))
    top = frame[frame["rank_in_bag"] <= k]
    precision = top.groupby("bag")["_truth"].mean().mean()
    chance = frame.groupby("bag")["_truth"].mean().mean()
    return float(precision), float(chance)


def run_pooling(patch_embeddings: str, out_dir: str, *, level: str = "donor",
                target: str = "diagnosis", positive: str = "schizophrenia",
                negative: str = "control", manifest: str = "",
                config: MILConfig | None = None, splits: tuple[str, ...] | None = None) -> dict:
    """`bin/evaluate --pooling=attention`: writes OUT/pooling.csv and attention_weights.csv.

    The target is a key column of the patch table, or else the manifest's per-donor
    column `target` (as the diagnosis task reads it). `splits` selects the rows scored as
    `bin/evaluate --splits` does for every task (`ish_tf.evaluate.splits`; None = all).

    Returns:
      {"scores": DataFrame, "written": {name: path}}.

    Raises:
      EmbeddingTableError, DiagnosisError, ValueError: bad inputs (naming them), or no
        scope with enough labelled bags of each class for the folds.
    """
    import os

    from ish_tf.data.embeddings import read_embedding_table
    from ish_tf.io_utils import atomic_path

    config = config or MILConfig()
    table = read_embedding_table(patch_embeddings)
    if splits is not None:
        from ish_tf.evaluate.splits import select_splits

        table, _ = select_splits(table, tuple(splits), "patch_embeddings")
    labels = None
    if target not in table.keys.columns:
        if not manifest:
            raise EmbeddingTableError(f"{patch_embeddings}: pooling target {target!r} is not a "
                                      "column of the table; pass --manifest to read it per donor")
        from ish_tf.data.manifest import read_manifest
        from ish_tf.evaluate.diagnosis import donor_labels

        labels = donor_labels(read_manifest(manifest), target, positive, negative,
                              source=manifest)
    scores, attention = compare_poolings(table, level, target, positive, negative,
                                         labels=labels, config=config)
    if scores.empty:
        raise ValueError(f"{patch_embeddings}: no {'gene' if level == 'donor' else 'set'} of "
                         f"{level}-level bags has {config.n_splits} bags of each class of "
                         f"{target!r}: nothing to cross-validate")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, frame in (("pooling", scores), ("attention_weights", attention)):
        path = os.path.join(out_dir, f"{name}.csv")
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False, float_format="%.6g")
        written[name] = path
    return {"scores": scores, "written": written}

"""Evaluation of the fluorescence families on held-out experiments.

From an exported model (or a Keras one) and a record set: per-site probabilities and
embeddings (`predict_sites`, images normalised as in training), averaged over the
sites of a well (`wells`), then

- accuracy of the model's own argmax over all classes (`accuracy`), with chance
  1 / classes beside it;
- plate-aware assignment (`plate_assignment`, an explicit post-processing step,
  always reported apart): in RxRx1 each plate holds each siRNA of one of 4 groups
  once, so per (experiment, plate) the group is chosen that the plate's
  probabilities support best (training plates define the groups), and wells are
  assigned to that group's classes one-to-one by the Hungarian algorithm
  (`scipy.optimize.linear_sum_assignment` on -log p); classes repeated on a plate
  (k wells each) are offered k times;
- siRNA re-identification across experiments (`ish_tf.evaluate.reid.evaluate_reid`:
  rank-1 of the nearest well of another experiment), with its exact chance.

The truth of held-out wells comes from the records' identities or from a table
(`truth.csv` of `bin/synth --modality=fluorescence`, or RxRx1's train.csv for held-out
training experiments) joined on (experiment, plate, well).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

_EPS = 1e-12


def predict_sites(predict: Callable, records_dir: str, split: str, pipeline,
                  batch_size: int = 64) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Runs `predict` over every site of a split.

    Args:
      predict: images (B, R, R, C) float32 -> (embedding (B, D), probabilities (B, n), ...)
        (a Keras model, or `exported_predictor`).
      records_dir, split: the records.
      pipeline: the `SitePipeline` (normalisation as in training, no jitter).

    Returns:
      (sites: image_id, experiment, plate, well, label; probabilities (N, n);
      embeddings (N, D)).
    """
    from ish_tf.families.fluorescence.data import evaluation_sites

    metas, probs, embs = [], [], []
    for images, meta in evaluation_sites(records_dir, split, pipeline, batch_size):
        out = predict(images)
        embs.append(np.asarray(out[0], np.float32))
        probs.append(np.asarray(out[1], np.float32))
        metas.append({k: v.numpy() for k, v in meta.items()})
    if not metas:
        raise ValueError(f"{records_dir}: split {split!r} has no sites")
    sites = pd.DataFrame({k: np.concatenate([m[k] for m in metas]) for k in metas[0]})
    for k in ("experiment", "plate", "well"):
        if k in sites and sites[k].dtype == object:
            sites[k] = sites[k].map(lambda b: b.decode() if isinstance(b, bytes) else b)
    return sites, np.concatenate(probs), np.concatenate(embs)


def exported_predictor(saved_model_dir: str) -> Callable:
    """The exported model's decoded-image signature as `images -> (embedding, probabilities)`."""
    import tensorflow as tf

    from ish_tf.export.saved_model import read_metadata, resolve_saved_model

    path = resolve_saved_model(saved_model_dir)
    loaded = tf.saved_model.load(path)
    meta = read_metadata(path)
    fn = loaded.signatures[meta.get("pixels_signature", "classify_images")]
    name = list(fn.structured_input_signature[1])[0]

    def predict(images):
        out = fn(**{name: tf.cast(images, tf.float32)})
        return out["embedding"], out["probabilities"]

    predict.loaded = loaded  # keep the SavedModel alive
    return predict


def well_codes(sites: pd.DataFrame) -> np.ndarray | None:
    """Each site's well: row k of the `wells` table (wells in order of first site), or
    None without a well column (each site is its own well)."""
    if "well" not in sites or (sites["well"].astype(str) == "").all():
        return None
    keys = ["experiment", "plate", "well"]
    return pd.factorize(pd.MultiIndex.from_frame(sites[keys].astype(str)))[0]


def wells(sites: pd.DataFrame, probs: np.ndarray, embs: np.ndarray
          ) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Averages the sites of each (experiment, plate, well): probabilities (mean) and
    embeddings (mean, re-normalised). Without a well column each site is a well."""
    codes = well_codes(sites)
    if codes is None:
        out = sites.reset_index(drop=True).copy()
        return out, probs, embs
    n = int(codes.max()) + 1
    count = np.bincount(codes, minlength=n).astype(np.float64)[:, None]
    p = np.zeros((n, probs.shape[1]))
    np.add.at(p, codes, probs)
    e = np.zeros((n, embs.shape[1]))
    np.add.at(e, codes, embs)
    e /= np.maximum(np.linalg.norm(e, axis=1, keepdims=True), _EPS)
    first = sites.groupby(codes, sort=True).first().reset_index(drop=True)
    labels = sites.groupby(codes, sort=True)["label"].max().to_numpy()
    first["label"] = labels
    return first, (p / count).astype(np.float32), e.astype(np.float32)


def attach_truth(table: pd.DataFrame, truth: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """Sets `label` from a truth table (experiment, plate, well, sirna) by class name.

    Raises:
      ValueError: a well without truth, or a truth class the model does not know.
    """
    index = {str(c): i for i, c in enumerate(classes)}
    t = truth.assign(experiment=truth["experiment"].astype(str), plate=truth["plate"].astype(str),
                     well=truth["well"].astype(str))
    t = t.drop_duplicates(["experiment", "plate", "well"]).set_index(["experiment", "plate", "well"])
    keys = list(zip(table["experiment"].astype(str), table["plate"].astype(str),
                    table["well"].astype(str), strict=True))
    missing = [k for k in keys if k not in t.index]
    if missing:
        raise ValueError(f"truth table has no row for {len(missing)} wells, e.g. {missing[0]}")
    names = [str(t.loc[k, "sirna"]) for k in keys]
    unknown = sorted({n for n in names if n not in index})
    if unknown:
        raise ValueError(f"truth classes {unknown[:5]} are not among the model's classes")
    return table.assign(label=[index[n] for n in names])


def class_groups(labels: np.ndarray, plates: Sequence[str]) -> list[np.ndarray]:
    """The distinct class sets of the training plates (sorted class arrays).

    Args:
      labels: (N,) class of each labelled well (-1 ignored).
      plates: (N,) plate key of each well ("experiment/plate").
    """
    sets: dict[tuple[int, ...], None] = {}
    frame = pd.DataFrame({"label": np.asarray(labels), "plate": np.asarray(plates)})
    for _, g in frame[frame.label >= 0].groupby("plate"):
        sets[tuple(sorted(set(int(x) for x in g.label)))] = None
    return [np.array(s, dtype=np.int64) for s in sets]


def plate_assignment(probs: np.ndarray, plates: Sequence[str],
                     groups: Sequence[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian assignment of wells to classes, plate by plate.

    Args:
      probs: (N, n) class probabilities of the wells.
      plates: (N,) plate key of each well.
      groups: class sets a plate may hold (None: every class).

    Returns:
      (assigned class (N,), chosen group index per well (N,), -1 without groups).

    Worked example: two wells with p = [[0.6, 0.4], [0.7, 0.3]] on one plate holding
    classes {0, 1} once each: argmax says 0, 0; the assignment minimising
    -log p gives well 0 -> 1, well 1 -> 0 (cost 0.92 + 0.36 = 1.27 < 0.51 + 1.20 = 1.71).
    """
    probs = np.asarray(probs, np.float64)
    plates = np.asarray([str(p) for p in plates])
    out = np.full(len(probs), -1, np.int64)
    chosen = np.full(len(probs), -1, np.int64)
    logp = np.log(probs + _EPS)
    for plate in np.unique(plates):
        rows = np.flatnonzero(plates == plate)
        if groups:
            support = [np.log(probs[rows][:, g].sum(axis=1) + _EPS).sum() for g in groups]
            gi = int(np.argmax(support))
            candidates = np.asarray(groups[gi])
            chosen[rows] = gi
        else:
            candidates = np.arange(probs.shape[1])
        repeats = int(np.ceil(len(rows) / len(candidates)))
        columns = np.tile(candidates, repeats)
        cost = -logp[np.ix_(rows, columns)]
        r, c = linear_sum_assignment(cost)
        out[rows[r]] = columns[c]
    return out, chosen


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of labelled wells (label >= 0) predicted right (NaN without any)."""
    labels = np.asarray(labels)
    mask = labels >= 0
    return float(np.mean(np.asarray(predicted)[mask] == labels[mask])) if mask.any() else float("nan")


def evaluate_predictions(table: pd.DataFrame, probs: np.ndarray, embs: np.ndarray,
                         groups: Sequence[np.ndarray] | None = None) -> dict:
    """Accuracy, plate-assigned accuracy and cross-experiment rank-1 of held-out wells.

    Returns:
      {"wells", "classes", "chance", "accuracy", "plate_assignment_accuracy",
       "plate_assignment_chance", "rank1_other_experiment", "rank1_chance"}.
    """
    from ish_tf.evaluate.reid import evaluate_reid

    labels = table["label"].to_numpy()
    n = probs.shape[1]
    plates = (table["experiment"].astype(str) + "/" + table["plate"].astype(str)).to_numpy()
    assigned, _ = plate_assignment(probs, plates, groups)
    result = {"wells": int((labels >= 0).sum()), "classes": int(n), "chance": 1.0 / n,
              "accuracy": accuracy(probs.argmax(1), labels),
              "plate_assignment_accuracy": accuracy(assigned, labels),
              # A random one-to-one assignment within the right group is right for
              # 1/|group| of the wells on average.
              "plate_assignment_chance": (float(np.mean([1.0 / len(g) for g in groups]))
                                          if groups else 1.0 / n)}
    mask = labels >= 0
    if mask.sum() > 1 and table.loc[mask, "experiment"].nunique() > 1:
        reid = evaluate_reid(embs[mask], labels[mask], table.loc[mask, "experiment"].to_numpy(),
                             metric="cosine", candidate_sets=("other_donor",), compute_map=False)
        row = reid.iloc[0]
        result["rank1_other_experiment"] = float(row["rank1_answerable"])
        result["rank1_chance"] = float(row["chance_answerable"])
    return result


def plate_labels(records_dir: str, split: str) -> pd.DataFrame:
    """(image_id, experiment, plate, well, label) of every site of a split, in file order,
    without decoding images."""
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.pipeline import list_shards
    from ish_tf.families.fluorescence.data import PLATE_KEY, WELL_KEY, schema_has

    keys = ["image_id", records.IDENTITY_INDEX_KEY, records.GROUP_KEY]
    keys += [k for k in (PLATE_KEY, WELL_KEY) if schema_has(k)]
    files = list_shards(records_dir, split)
    ds = tf.data.TFRecordDataset(files, compression_type=shards.compression_of(files[0]) or "")
    rows = []
    for feats in ds.map(lambda r: records.parse_example(r, keys, "image")).as_numpy_iterator():
        rows.append({"image_id": int(feats["image_id"]),
                     "experiment": feats[records.GROUP_KEY].decode(),
                     "plate": str(feats.get(PLATE_KEY, "")),
                     "well": feats[WELL_KEY].decode() if WELL_KEY in feats else "",
                     "label": int(feats[records.IDENTITY_INDEX_KEY])})
    return pd.DataFrame(rows)


def training_class_groups(records_dir: str, split: str = "train") -> list[np.ndarray]:
    """`class_groups` of the labelled plates of a split."""
    t = plate_labels(records_dir, split)
    return class_groups(t["label"].to_numpy(), (t["experiment"] + "/" + t["plate"]).to_numpy())


def plate_pseudo_labels(predict: Callable, records_dir: str, split: str, pipeline,
                        groups: Sequence[np.ndarray] | None) -> pd.DataFrame:
    """Pseudo-labels of a split's sites from the plate-aware assignment of its wells.

    The sites' probabilities (`predict_sites`) are averaged per well (`wells`), each
    plate's wells are assigned to the classes of its best-supported group one-to-one
    (`plate_assignment`), and every site takes its well's class. The split's own labels
    are not used.

    Returns:
      (image_id, pseudo_label) of every site, in file order.
    """
    sites, probs, embs = predict_sites(predict, records_dir, split, pipeline)
    table, p, _ = wells(sites.assign(label=-1), probs, embs)
    plates = (table["experiment"].astype(str) + "/" + table["plate"].astype(str)).to_numpy()
    assigned, _ = plate_assignment(p, plates, groups)
    codes = well_codes(sites)
    per_site = assigned if codes is None else assigned[codes]
    return pd.DataFrame({"image_id": sites["image_id"].to_numpy().astype(np.int64),
                         "pseudo_label": per_site.astype(np.int64)})


def evaluate_split(predict: Callable, records_dir: str, split: str, pipeline,
                   groups: Sequence[np.ndarray] | None) -> dict:
    """`evaluate_predictions` of the wells of a split (sites averaged per well)."""
    sites, probs, embs = predict_sites(predict, records_dir, split, pipeline)
    table, p, e = wells(sites, probs, embs)
    result = evaluate_predictions(table, p, e, groups)
    result["sites"] = len(sites)
    return result


def evaluate_export(saved_model: str, records_dir: str, splits: Sequence[str] = (),
                    out_dir: str = "") -> dict:
    """`evaluate_split` of an exported fluorescence/mean_teacher model on each held-out
    split (`bin/evaluate --task=plates`), as the quickstart scores it.

    Sites are normalised with the export's training normalisation (from its sidecar) and
    the records' statistics; class groups for the plate-aware assignment come from the
    records' train split.

    Args:
      saved_model: an export base or version directory (bin/export).
      records_dir: the records (bin/extract of an RxRx1 manifest).
      splits: splits to score; empty = every split but train.
      out_dir: where plates.json (and plates.csv, one row per split) go; "" = nowhere.

    Returns:
      {"saved_model", "records_dir", "splits": {split: metrics}, "written": {...}}.

    Raises:
      ValueError: not a fluorescence export, or no such split.
    """
    import json
    import os

    from ish_tf.data import shards
    from ish_tf.export.saved_model import read_metadata, resolve_saved_model
    from ish_tf.families.fluorescence.data import make_pipeline
    from ish_tf.io_utils import atomic_write_text

    path = resolve_saved_model(saved_model)
    meta = read_metadata(path)
    if meta.get("family") not in ("fluorescence", "mean_teacher"):
        raise ValueError(f"{path}: a {meta.get('family')!r} export; --task=plates scores "
                         "fluorescence or mean_teacher exports")
    config = ((meta.get("extra") or {}).get("model_config") or {}).get("config") or {}
    normalization = (config.get("family") or {}).get("normalization", "plate")
    present = sorted({s["split"] for s in shards.load_index(records_dir)["shards"]})
    splits = list(splits) or [s for s in present if s != "train"]
    missing = [s for s in splits if s not in present]
    if missing or not splits:
        raise ValueError(f"{records_dir}: no split {missing or splits} (it has {present})")
    pipeline = make_pipeline(records_dir, normalization, 0.0, meta.get("input_size"))
    groups = training_class_groups(records_dir) if "train" in present else None
    predict = exported_predictor(path)
    result = {"saved_model": os.path.abspath(path), "records_dir": os.path.abspath(records_dir),
              "family": meta["family"], "normalization": normalization,
              "splits": {s: evaluate_split(predict, records_dir, s, pipeline, groups)
                         for s in splits}, "written": {}}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        rows = pd.DataFrame([{"split": s, **m} for s, m in result["splits"].items()])
        result["written"] = {"plates.csv": os.path.join(out_dir, "plates.csv"),
                             "plates.json": os.path.join(out_dir, "plates.json")}
        atomic_write_text(result["written"]["plates.csv"], rows.to_csv(index=False))
        atomic_write_text(result["written"]["plates.json"],
                          json.dumps(result, indent=1, sort_keys=True) + "\n")
    return result

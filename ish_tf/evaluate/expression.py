"""Expression evaluation of cell identity codes (`bin/evaluate --task=expression`).

Reads the `bin/ingest --expression` directory (its records: the held-out profiles exactly
as the model saw them; profiles.csv: labels) and an exported vector model (`cic`); codes
come from a `bin/embed` table when one is given (joined by sample_id) and otherwise from
the served model. Scores, on the TEST split (models and baselines fitted on train):

* reconstruction: MSE over profiles x genes (standardised units; predicting the training
  mean scores about 1), mean per-profile Pearson and Spearman, and the paper's test: the
  rank of each reconstruction's Pearson similarity to its own profile among all test
  profiles (1 = closest to its own; chance: mean rank (N + 1) / 2, rank-1 rate 1 / N);
  baselines at the same code width from scikit-learn: PCA, NMF (on the non-negative
  values before standardisation; shifted by each gene's training minimum if some are
  negative) and KernelPCA (poly, cosine, rbf) with `fit_inverse_transform`;
* classification of the label from codes with logistic regression and an RBF SVM, the
  same on PCA features, an SVM (and logistic regression) on all model genes, the
  classifier-autoencoder's own softmax (`classifier_model`), majority class and chance;
* robustness: Gaussian noise of standard deviation s (standardised units) added to the
  test profiles: relative code change and the accuracy of the clean-trained logistic
  regression on the noisy codes, for the model and PCA;
* unseen cell types (`unseen_profiles` from `bin/ingest --split_by=label` and
  `unseen_model` trained on it): reconstruction of the held-out types against the seen
  ones (validation), where their codes land (nearest seen-type centroid), and whether
  they form their own group (cross-validated accuracy of seen + unseen labels from codes,
  against PCA).

Writes OUT/expression_summary.json, reconstruction.csv, own_rank.csv, classification.csv,
noise.csv, unseen.csv (if run), figures/codes_map.png (2-D PCA of the test codes coloured
by label) and report.md / report.html.
"""

from __future__ import annotations

import dataclasses
import html
import json
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_write_text

KERNELS = ("poly", "cosine", "rbf")
SUMMARY_NAME = "expression_summary.json"


@dataclasses.dataclass(frozen=True)
class ExpressionEvalConfig:
    """Settings of `evaluate_expression`.

    Attributes:
      profiles_dir: the `bin/ingest --expression` directory the model was trained on.
      saved_model: export (base or version) of the autoencoder.
      out_dir: OUT.
      embedding: a `bin/embed --expression` codes table (sample_id + code_*); "" = codes
        through `saved_model`.
      classifier_model: export of a cic_classifier trained on the same records ("" = none).
      unseen_profiles, unseen_model: an ingest with whole labels held out as test, and a
        model trained on it ("" = no unseen-type test).
      noise_levels: standard deviations of the added noise.
      kernel_max_train: at most this many training profiles fit KernelPCA (O(n^3)).
      baselines: which reconstruction baselines run (pca, nmf, kpca_poly, kpca_cosine,
        kpca_rbf).
      report: write the figure and report.
      seed: seed of noise, subsampling and baselines.
    """

    profiles_dir: str
    saved_model: str
    out_dir: str
    embedding: str = ""
    classifier_model: str = ""
    unseen_profiles: str = ""
    unseen_model: str = ""
    noise_levels: tuple[float, ...] = (0.25, 0.5, 1.0)
    kernel_max_train: int = 2000
    baselines: tuple[str, ...] = ("pca", "nmf", "kpca_poly", "kpca_cosine", "kpca_rbf")
    report: bool = True
    seed: int = 0

    def validate(self) -> ExpressionEvalConfig:
        """Raises ValueError naming the flag of a missing or bad value; returns self."""
        if not self.profiles_dir:
            raise ValueError("--task=expression needs --profiles: the bin/ingest --expression "
                             "directory")
        if not self.saved_model:
            raise ValueError("--task=expression needs --saved_model: the exported cic model")
        if not self.out_dir:
            raise ValueError("--out is required")
        if bool(self.unseen_profiles) != bool(self.unseen_model):
            raise ValueError("--unseen_profiles and --unseen_model go together")
        known = {"pca", "nmf", *(f"kpca_{k}" for k in KERNELS)}
        bad = [b for b in self.baselines if b not in known]
        if bad:
            raise ValueError(f"--expression_baselines: unknown {bad}; known: {sorted(known)}")
        if any(s <= 0 for s in self.noise_levels):
            raise ValueError(f"--noise_levels must be positive, got {self.noise_levels}")
        return self


# --------------------------------------------------------------------------- metrics
def _rowwise_z(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(x, axis=1)


def reconstruction_metrics(profiles: np.ndarray, recon: np.ndarray) -> dict:
    """MSE, per-profile Pearson/Spearman (means) and the own-profile rank test.

    Args:
      profiles: (N, G) true profiles.
      recon: (N, G) their reconstructions.

    Returns:
      {"mse", "pearson", "spearman", "own_rank_mean", "own_rank1", "own_ranks" (N,)}:
      own_ranks[i] = 1 + the number of test profiles j != i whose Pearson similarity to
      reconstruction i exceeds that of profile i.
    """
    profiles = np.asarray(profiles, np.float64)
    recon = np.asarray(recon, np.float64)
    mse = float(np.mean((profiles - recon) ** 2))
    zp, zr = _rowwise_z(profiles), _rowwise_z(recon)
    pearson = np.sum(zp * zr, axis=1)
    spearman = np.sum(_rowwise_z(_ranks(profiles)) * _rowwise_z(_ranks(recon)), axis=1)
    sim = zr @ zp.T  # (N reconstructions, N profiles)
    own = np.diag(sim)
    ranks = 1 + np.sum(sim > own[:, None], axis=1)
    return {"mse": mse, "pearson": float(pearson.mean()), "spearman": float(spearman.mean()),
            "own_rank_mean": float(ranks.mean()), "own_rank1": float(np.mean(ranks == 1)),
            "own_ranks": ranks}


# --------------------------------------------------------------------------- baselines
def fit_baselines(train: np.ndarray, width: int, names: Sequence[str], *, raw_mean: np.ndarray,
                  raw_std: np.ndarray, max_kernel_train: int = 2000, seed: int = 0,
                  log: Callable[[str], None] = lambda s: None) -> dict[str, dict]:
    """Fits each baseline at `width` components on the (standardised) training profiles.

    Returns:
      {name: {"encode": f(X) -> codes, "decode": f(codes) -> X (standardised),
      "note": str, "seconds": float}}; a baseline that cannot be fitted is
      {"skipped": reason}.
    """
    from sklearn.decomposition import NMF, PCA, KernelPCA

    out: dict[str, dict] = {}
    rng = np.random.default_rng(seed)
    width = int(min(width, train.shape[0] - 1, train.shape[1]))
    for name in names:
        t0 = time.monotonic()
        try:
            if name == "pca":
                m = PCA(n_components=width, random_state=seed).fit(train)
                out[name] = {"encode": m.transform, "decode": m.inverse_transform,
                             "note": f"PCA, {width} components"}
            elif name == "nmf":
                raw = train * raw_std + raw_mean
                # Undoing the standardisation leaves rounding noise (~1e-7) below zero.
                low = raw.min(axis=0)
                shift = np.where(low < -1e-4, low, 0.0)
                note = "NMF on the values before standardisation"
                if np.any(shift < 0):
                    note += " (shifted by each gene's training minimum: some were negative)"
                m = NMF(n_components=width, init="nndsvda", max_iter=500, random_state=seed)
                m.fit(np.maximum(raw - shift, 0.0))

                def enc(x, m=m, shift=shift):
                    return m.transform(np.maximum(x * raw_std + raw_mean - shift, 0.0))

                def dec(c, m=m, shift=shift):
                    return (m.inverse_transform(c) + shift - raw_mean) / raw_std

                out[name] = {"encode": enc, "decode": dec, "note": f"{note}, {width} components"}
            elif name.startswith("kpca_"):
                kernel = name.split("_", 1)[1]
                fit_rows = train
                note = f"KernelPCA ({kernel}), {width} components, fit_inverse_transform"
                if len(train) > max_kernel_train:
                    fit_rows = train[rng.choice(len(train), max_kernel_train, replace=False)]
                    note += f", fitted on {max_kernel_train} of {len(train)} training profiles"
                m = KernelPCA(n_components=width, kernel=kernel, fit_inverse_transform=True,
                              random_state=seed).fit(fit_rows)
                out[name] = {"encode": m.transform, "decode": m.inverse_transform, "note": note}
            else:
                raise ValueError(f"unknown baseline {name!r}")
        except (ValueError, np.linalg.LinAlgError) as e:
            out[name] = {"skipped": f"{type(e).__name__}: {e}"}
            log(f"evaluate: baseline {name} skipped: {e}")
            continue
        out[name]["seconds"] = round(time.monotonic() - t0, 2)
    return out


# --------------------------------------------------------------------------- classification
def _lr():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))


def _svm():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(kernel="rbf"))


def _accuracy_row(name: str, features: str, predicted: np.ndarray, truth: np.ndarray,
                  note: str = "") -> dict:
    errors = int(np.sum(np.asarray(predicted).astype(str) != np.asarray(truth).astype(str)))
    return {"method": name, "features": features, "accuracy": 1.0 - errors / max(len(truth), 1),
            "errors": errors, "n_test": int(len(truth)), "note": note}


def classification_table(features: dict[str, tuple[np.ndarray, np.ndarray]],
                         y_train: np.ndarray, y_test: np.ndarray) -> list[dict]:
    """LR and SVM per feature set, fitted on train and scored on test (+ majority, chance).

    Args:
      features: name -> (train features, test features).
    """
    rows = []
    if len(set(y_train)) < 2:
        return rows
    for name, (tr, te) in features.items():
        for clf_name, make in (("lr", _lr), ("svm", _svm)):
            clf = make().fit(tr, y_train)
            rows.append(_accuracy_row(f"{name}_{clf_name}", name, clf.predict(te), y_test))
    values, counts = np.unique(y_train, return_counts=True)
    majority = values[np.argmax(counts)]
    rows.append(_accuracy_row("majority", "-", np.full(len(y_test), majority), y_test,
                              f"always {majority!r}"))
    n = len(set(y_train) | set(y_test))
    rows.append({"method": "chance", "features": "-", "accuracy": 1.0 / n,
                 "errors": int(round(len(y_test) * (1 - 1.0 / n))), "n_test": int(len(y_test)),
                 "note": f"1/{n} classes"})
    return rows


# --------------------------------------------------------------------------- the evaluation
def _codes_from_table(path: str, sample_ids: np.ndarray) -> np.ndarray:
    """The code_* columns of a `bin/embed --expression` table, rows in `sample_ids` order."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such codes table")
    frame = pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(
        path, dtype={"sample_id": str}, low_memory=False)
    cols = [c for c in frame.columns if str(c).startswith("code_")]
    if "sample_id" not in frame.columns or not cols:
        raise ValueError(f"{path}: needs sample_id and code_* columns (bin/embed --expression)")
    frame = frame.set_index(frame["sample_id"].astype(str))[cols]
    missing = [s for s in sample_ids if s not in frame.index]
    if missing:
        raise ValueError(f"{path}: {len(missing)} profiles have no codes, e.g. {missing[:5]}")
    return frame.loc[list(sample_ids)].to_numpy(np.float32)


def _check_genes(model, prep, profiles_dir: str) -> None:
    """A model trained on other genes (its ingest directory, found from the export) than
    `profiles_dir` holds is refused: its inputs would be misread."""
    from ish_tf.data.expression import Preprocessing
    from ish_tf.embed_expression import ExpressionEmbedError, preprocessing_dir_of

    if model.dim != len(prep.genes):
        raise ValueError(f"{model.path} takes {model.dim} genes; {profiles_dir} holds "
                         f"{len(prep.genes)}")
    try:
        trained_on = preprocessing_dir_of(model)
    except ExpressionEmbedError:
        return  # moved or foreign: the width is all that can be checked
    genes = Preprocessing.load(trained_on).genes
    if list(genes) != list(prep.genes):
        raise ValueError(f"{model.path} was trained on the genes of {trained_on}, not those of "
                         f"{profiles_dir} ({sum(a != b for a, b in zip(genes, prep.genes, strict=False))} of "
                         f"{len(genes)} differ)")


def _clean(metrics: dict) -> dict:
    return {k: round(float(v), 5) for k, v in metrics.items() if k != "own_ranks"}


def evaluate_expression(cfg: ExpressionEvalConfig,
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """Runs the evaluation (module docstring); returns the summary (also written).

    Raises:
      ValueError: bad settings, or inputs that do not fit together (naming them).
    """
    from ish_tf.data.expression import read_ingested
    from ish_tf.embed_expression import VectorModel

    cfg.validate()
    if cfg.unseen_profiles:
        _check_unseen_split(cfg.unseen_profiles)
    os.makedirs(cfg.out_dir, exist_ok=True)
    _, prep, splits = read_ingested(cfg.profiles_dir)
    for need in ("train", "test"):
        if need not in splits:
            raise ValueError(f"{cfg.profiles_dir}: no {need} split in the records")
    train, test = splits["train"], splits["test"]
    model = VectorModel(cfg.saved_model)
    _check_genes(model, prep, cfg.profiles_dir)
    out_train, out_test = model(train.values), model(test.values)
    if "reconstruction" not in out_test or "code" not in out_test:
        raise ValueError(f"{cfg.saved_model}: outputs {model.outputs}; needs code and "
                         "reconstruction (a cic export)")
    code_train, code_test = out_train["code"], out_test["code"]
    codes_source = "served model"
    if cfg.embedding:
        code_test = _codes_from_table(cfg.embedding, test.sample_id)
        code_train = _codes_from_table(cfg.embedding, train.sample_id)
        codes_source = os.path.abspath(cfg.embedding)
    width = code_test.shape[1]
    log(f"evaluate: {len(train.values)} training and {len(test.values)} test profiles x "
        f"{model.dim} genes; codes of {width}")

    recon_rows, own_rows = [], {}
    m = reconstruction_metrics(test.values, out_test["reconstruction"])
    recon_rows.append({"method": "cic", "note": f"the exported model ({width}-value code)",
                       **_clean(m)})
    own_rows["cic"] = m["own_ranks"]
    m0 = reconstruction_metrics(test.values, np.zeros_like(test.values) + train.values.mean(0))
    recon_rows.append({"method": "training_mean", "note": "every profile predicted as the "
                       "training mean (chance level)", **_clean(m0)})
    baselines = fit_baselines(train.values, width, cfg.baselines, raw_mean=prep.mean,
                              raw_std=prep.std, max_kernel_train=cfg.kernel_max_train,
                              seed=cfg.seed, log=log)
    for name, b in baselines.items():
        if "skipped" in b:
            recon_rows.append({"method": name, "note": "skipped: " + b["skipped"]})
            continue
        m = reconstruction_metrics(test.values, b["decode"](b["encode"](test.values)))
        recon_rows.append({"method": name, "note": b["note"], **_clean(m)})
        own_rows[name] = m["own_ranks"]
    recon = pd.DataFrame(recon_rows)

    # Classification: features fitted on train, scored on test.
    feats = {"cic_codes": (code_train, code_test), "genes": (train.values, test.values)}
    if "pca" in baselines and "skipped" not in baselines["pca"]:
        p = baselines["pca"]["encode"]
        feats["pca"] = (p(train.values), p(test.values))
    cls_rows = classification_table(feats, train.labels, test.labels)
    classifier_note = ""
    if cfg.classifier_model:
        clf = (model if os.path.abspath(cfg.classifier_model) == os.path.abspath(
            cfg.saved_model) else VectorModel(cfg.classifier_model))
        _check_genes(clf, prep, cfg.profiles_dir)
        names = clf.class_names
        if "probabilities" not in clf.outputs or not names:
            raise ValueError(f"{cfg.classifier_model}: no probabilities or class names (export "
                             "a cic_classifier run)")
        probs = clf(test.values)["probabilities"]
        predicted = np.asarray(names)[np.argmax(probs, axis=1)]
        cls_rows.append(_accuracy_row("classifier_ae", "code -> softmax", predicted,
                                      test.labels, "the classifier-autoencoder's own softmax"))
        classifier_note = os.path.abspath(clf.path)
    cls = pd.DataFrame(cls_rows)

    noise = _noise_table(cfg, model, train, test, baselines, code_train)
    unseen = _unseen_table(cfg, log) if cfg.unseen_profiles else pd.DataFrame()

    ranks = pd.DataFrame({"sample_id": test.sample_id, "label": test.labels,
                          **{k: v for k, v in own_rows.items()}})
    written = {}
    for name, frame in (("reconstruction", recon), ("classification", cls), ("noise", noise),
                        ("own_rank", ranks), ("unseen", unseen)):
        if len(frame):
            written[name] = os.path.join(cfg.out_dir, f"{name}.csv")
            atomic_write_text(written[name], frame.to_csv(index=False))
    summary = _summary(cfg, recon, cls, noise, unseen, train, test, width, model.dim,
                       codes_source, classifier_note, written)
    if cfg.report:
        written.update(write_report(cfg.out_dir, summary, recon, cls, noise, unseen,
                                    code_test, test.labels))
        summary["written"] = written
    atomic_write_text(os.path.join(cfg.out_dir, SUMMARY_NAME),
                      json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def _noise_table(cfg, model, train, test, baselines, code_train) -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed)
    clean = {"cic": (code_train, model(test.values)["code"], lambda x: model(x)["code"])}
    if "pca" in baselines and "skipped" not in baselines["pca"]:
        enc = baselines["pca"]["encode"]
        clean["pca"] = (enc(train.values), enc(test.values), enc)
    rows = []
    for name, (tr, te, encode) in clean.items():
        lr = _lr().fit(tr, train.labels) if len(set(train.labels)) > 1 else None
        base_acc = float(np.mean(lr.predict(te) == test.labels)) if lr else float("nan")
        for s in (0.0, *cfg.noise_levels):
            noisy = test.values + rng.normal(0.0, s, test.values.shape).astype(np.float32)
            codes = encode(noisy) if s else te
            change = np.linalg.norm(codes - te, axis=1) / np.maximum(
                np.linalg.norm(te - tr.mean(0), axis=1), 1e-12)
            acc = float(np.mean(lr.predict(codes) == test.labels)) if lr else float("nan")
            rows.append({"codes": name, "noise_sd": s, "relative_code_change":
                         round(float(np.median(change)), 5), "lr_accuracy": round(acc, 5),
                         "lr_accuracy_clean": round(base_acc, 5)})
    return pd.DataFrame(rows)


def _check_unseen_split(profiles_dir: str) -> None:
    """The unseen-type ingest must hold whole labels out: test labels never in train."""
    from ish_tf.data.expression import PROFILES_NAME

    path = os.path.join(profiles_dir, PROFILES_NAME)
    if not os.path.exists(path):
        raise ValueError(f"{profiles_dir}: no {PROFILES_NAME} (give a bin/ingest --expression "
                         "directory)")
    profiles = pd.read_csv(path, dtype={"label": str})
    test = set(profiles.loc[profiles["split"] == "test", "label"])
    train = set(profiles.loc[profiles["split"] == "train", "label"])
    if not test or not train:
        raise ValueError(f"{profiles_dir}: needs train and test (held-out labels) splits")
    if test & train:
        raise ValueError(f"{profiles_dir}: the test split shares labels {sorted(test & train)[:5]} "
                         "with train: ingest it with --split_by=label")


def _unseen_table(cfg, log) -> pd.DataFrame:
    """Reconstruction and placement of whole labels the model never saw."""
    from sklearn.decomposition import PCA
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from ish_tf.data.expression import read_ingested
    from ish_tf.embed_expression import VectorModel

    _, prep, splits = read_ingested(cfg.unseen_profiles)
    train, unseen = splits["train"], splits["test"]
    seen = splits.get("validation", train)
    model = VectorModel(cfg.unseen_model)
    _check_genes(model, prep, cfg.unseen_profiles)
    pca = PCA(n_components=min(model(train.values[:1])["code"].shape[1],
                               len(train.values) - 1), random_state=cfg.seed).fit(train.values)
    codes = {"cic": lambda x: model(x)["code"], "pca": pca.transform}
    recon = {"cic": lambda x: model(x)["reconstruction"],
             "pca": lambda x: pca.inverse_transform(pca.transform(x))}
    rows = []
    for name in ("cic", "pca"):
        for part, data in (("seen (validation)", seen), ("unseen (held-out labels)", unseen)):
            m = reconstruction_metrics(data.values, recon[name](data.values))
            rows.append({"codes": name, "profiles": part, "n": len(data.values),
                         "labels": ";".join(sorted(set(data.labels))), **_clean(m)})
        # Placement: nearest seen-type centroid of each unseen profile's code.
        tr_codes = codes[name](train.values)
        labels = sorted(set(train.labels))
        centroids = np.stack([tr_codes[train.labels == lab].mean(0) for lab in labels])
        un_codes = codes[name](unseen.values)
        d = ((un_codes[:, None, :] - centroids[None]) ** 2).sum(-1)
        nearest = pd.Series(np.asarray(labels)[np.argmin(d, axis=1)]).value_counts()
        # Own group: cross-validated LR over seen (validation) + unseen labels from codes.
        x = np.concatenate([codes[name](seen.values), un_codes])
        y = np.concatenate([seen.labels, np.asarray(["unseen:" + v for v in unseen.labels])])
        counts = pd.Series(y).value_counts()
        keep = np.isin(y, counts[counts >= 3].index)
        folds = int(min(5, counts[counts >= 3].min())) if keep.any() else 0
        sep = float("nan")
        if folds >= 2 and len(set(y[keep])) > 1:
            pred = cross_val_predict(_lr(), x[keep], y[keep], cv=StratifiedKFold(
                folds, shuffle=True, random_state=cfg.seed))
            is_unseen = np.char.startswith(y[keep].astype(str), "unseen:")
            sep = float(np.mean(pred[is_unseen] == y[keep][is_unseen]))
        rows.append({"codes": name, "profiles": "unseen placement", "n": len(un_codes),
                     "labels": "; ".join(f"{k}: {v}" for k, v in nearest.items()),
                     "unseen_recall_cv": round(sep, 5)})
    log("evaluate: unseen cell types " + ", ".join(sorted(set(unseen.labels))))
    return pd.DataFrame(rows)


def _summary(cfg, recon, cls, noise, unseen, train, test, width, dim, codes_source,
             classifier, written) -> dict:
    def rec(method):
        row = recon[recon["method"] == method]
        if not len(row) or "mse" not in row or pd.isna(row["mse"].iloc[0]):
            return None
        r = row.iloc[0]
        return {k: float(r[k]) for k in ("mse", "pearson", "spearman", "own_rank_mean",
                                         "own_rank1")}

    def acc(method):
        row = cls[cls["method"] == method] if len(cls) else cls
        if not len(row):
            return None
        r = row.iloc[0]
        return {"accuracy": round(float(r["accuracy"]), 5), "errors": int(r["errors"]),
                "n_test": int(r["n_test"])}

    n = len(test.values)
    return {
        "profiles": os.path.abspath(cfg.profiles_dir), "saved_model": cfg.saved_model,
        "codes_from": codes_source, "classifier_model": classifier,
        "n_train": len(train.values), "n_test": n, "n_genes": dim, "code_size": width,
        "labels": sorted(set(train.labels) | set(test.labels)),
        "reconstruction": {m: rec(m) for m in recon["method"] if rec(m) is not None},
        "reconstruction_chance": {"own_rank_mean": (n + 1) / 2, "own_rank1": 1.0 / max(n, 1),
                                  "mse_training_mean": rec("training_mean")},
        "classification": {
            "cic_codes_lr": acc("cic_codes_lr"), "cic_codes_svm": acc("cic_codes_svm"),
            "pca_lr": acc("pca_lr"), "pca_svm": acc("pca_svm"), "svm_genes": acc("genes_svm"),
            "lr_genes": acc("genes_lr"), "classifier_ae": acc("classifier_ae")},
        "classification_baselines": {"majority": acc("majority"), "chance": acc("chance")},
        "noise": noise.to_dict(orient="records"),
        "unseen": unseen.to_dict(orient="records") if len(unseen) else None,
        "written": written,
    }


# --------------------------------------------------------------------------- report
def _markdown_table(frame: pd.DataFrame) -> str:
    frame = frame.fillna("")
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v)
                                       for v in r) + " |")
    return "\n".join(lines)


def write_report(out_dir: str, summary: dict, recon: pd.DataFrame, cls: pd.DataFrame,
                 noise: pd.DataFrame, unseen: pd.DataFrame, codes: np.ndarray,
                 labels: np.ndarray) -> dict[str, str]:
    """figures/codes_map.png (2-D PCA of the test codes by label), report.md, report.html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    xy = PCA(n_components=2).fit_transform(codes) if codes.shape[1] > 2 else codes
    fig, ax = plt.subplots(figsize=(6.5, 5))
    for i, lab in enumerate(sorted(set(labels))):
        sel = labels == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=10, label=f"{lab} ({int(sel.sum())})",
                   color=plt.cm.tab10(i % 10), marker="o" if i < 10 else "^")
    ax.set_xlabel("code PC 1")
    ax.set_ylabel("code PC 2")
    ax.set_title(f"Cell identity codes of {len(labels)} test profiles")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    fig.tight_layout()
    png = os.path.join(fig_dir, "codes_map.png")
    fig.savefig(png + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(png + ".tmp.png", png)
    keep = [c for c in ("method", "mse", "pearson", "spearman", "own_rank_mean", "own_rank1",
                        "note") if c in recon.columns]
    parts = [
        "# Cell identity codes: expression evaluation", "",
        f"{summary['n_train']} training and {summary['n_test']} test profiles, "
        f"{summary['n_genes']} genes, codes of {summary['code_size']}. Test split only; every "
        "model and baseline fitted on the training split.", "",
        "## Reconstruction (standardised units)", "",
        f"Chance: own-profile rank {summary['reconstruction_chance']['own_rank_mean']:.1f} "
        f"(rank-1 rate {summary['reconstruction_chance']['own_rank1']:.4f}).", "",
        _markdown_table(recon[keep]), "",
        "## Cell-type classification from codes", "", _markdown_table(cls), "",
        "## Robustness to added noise", "", _markdown_table(noise), ""]
    if len(unseen):
        parts += ["## Unseen cell types", "", _markdown_table(unseen), ""]
    parts += ["## 2-D map of the codes", "", "![codes](figures/codes_map.png)", ""]
    md = "\n".join(parts)
    md_path = os.path.join(out_dir, "report.md")
    atomic_write_text(md_path, md)
    body = []
    for line in md.splitlines():
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        elif line.startswith("!["):
            body.append('<img src="figures/codes_map.png" alt="codes map">')
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    text, in_table = [], False
    for b in body:  # wrap consecutive rows in a table
        if b.startswith("<tr>") and not in_table:
            text.append("<table border=1 cellpadding=3>")
            in_table = True
        if not b.startswith("<tr>") and in_table:
            text.append("</table>")
            in_table = False
        text.append(b)
    if in_table:
        text.append("</table>")
    html_path = os.path.join(out_dir, "report.html")
    atomic_write_text(html_path, "<!doctype html><html><head><meta charset='utf-8'><title>"
                      "Cell identity codes</title></head><body>" + "\n".join(text)
                      + "</body></html>\n")
    return {"report": html_path, "report_md": md_path, "codes_map": png}

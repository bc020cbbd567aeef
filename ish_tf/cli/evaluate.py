"""`bin/evaluate`: score embeddings on annotations, GO, diagnosis and re-identification.

Examples (after bin/quickstart, which writes work/quickstart/):
  bin/evaluate --task=reid --out=work/eval_reid \\
      --embedding=work/quickstart/embeddings/trained/image_embeddings.csv
  bin/evaluate --task=annotations --out=work/eval_annotations \\
      --embeddings=trained=work/quickstart/embeddings/trained/gene_embeddings.csv,untrained=work/quickstart/embeddings/untrained/gene_embeddings.csv \\
      --annotations=work/quickstart/data/annotations.csv --annotation_columns=level,pattern
  bin/evaluate --flagfile=configs/evaluate_cortex.cfg   # the published embeddings + Zeng table

Tasks (--task, one or more; each says what it needs):
{TASK_HELP}

Writes, under --out, for the tasks that ran:
  annotations.csv (annotation, category, n_genes, auc, auc_pr, f1, max_p, embedding, ...),
  annotations_summary.csv (mean AUC per embedding and category), annotations_wide.csv
  (a column per embedding), comparisons.csv (paired tests; 2+ embeddings),
  annotations_skipped.csv, gene_matches.csv;
  diagnosis.csv (per gene), diagnosis_top.csv, diagnosis_summary.csv, diagnosis_skipped.csv;
  reid.csv; figures/*.png and report.html (--report); evaluate_flags.cfg (replayable);
  with --pooling=attention and --patch_embeddings: pooling.csv (mean vs attention-MIL
  pooling on the same folds) and attention_weights.csv (one weight per patch).

Expression profiles (`ish_tf.evaluate.expression`), a task of its own:
  bin/evaluate --task=expression --profiles=data/pbmc --saved_model=export/cic \
      --classifier_model=export/cic_classifier --embedding=embed/codes.csv --out=eval/cic
writes expression_summary.json, reconstruction.csv, own_rank.csv, classification.csv,
noise.csv (unseen.csv with --unseen_profiles/--unseen_model), figures/codes_map.png and
report.md/report.html.

Fluorescence plates (`ish_tf.families.fluorescence.evaluation`), a task of its own:
  bin/evaluate --task=plates --saved_model=export/mean_teacher --records_dir=data/plate_records \
      --out=eval/plates
scores an exported fluorescence/mean_teacher model on the held-out splits (--splits;
default every split but train): well accuracy (chance beside it), plate-aware assignment
accuracy (reported apart) and siRNA rank-1 across experiments (with its chance); writes
plates.csv and plates.json.
"""

from __future__ import annotations

import os
import sys
import time

from ish_tf import config
from ish_tf.cli import define_common, definer, run, usage_errors

NAME = "evaluate"
USES_TENSORFLOW = False

#: What each task scores and needs (shown by --help and when --task is missing).
TASK_HELP = """\
  annotations  predict annotation groups from gene-level embeddings (cross-validated AUC);
               needs --embedding/--embeddings (gene level: gene_embeddings.csv) and one of
               --zeng_table, --gaf or --annotations
  diagnosis    predict a donor label (e.g. schizophrenia) per gene from donor-level
               embeddings; needs --embedding/--embeddings and --manifest with the label
               column (--diagnosis_label)
  reid         re-identify genes across donors (rank-1, mAP, chance); needs
               --embedding/--embeddings (image, patch or donor level: image_embeddings.csv)
  expression   cell identity codes against PCA/NMF/KernelPCA and classifiers (run alone);
               needs --profiles (a bin/ingest --expression directory), --saved_model and
               --embedding (bin/embed's codes.csv)"""
__doc__ = __doc__.replace("{TASK_HELP}", TASK_HELP)  # noqa: A001 - --help shows the list


def define_evaluate(fv) -> None:
    """Flags of `bin/evaluate` (annotation/GO prediction, donor control, diagnosis, reid)."""
    d = definer(fv, NAME)
    d.list("task", [], "Tasks to run, one or more of: annotations, diagnosis, reid; or "
           "expression (alone: cell identity codes against PCA/NMF/KernelPCA); or plates "
           "(alone: a fluorescence export on held-out experiments). See the list above for "
           "what each needs.")
    d.string("embedding", "", "One embedding table (CSV/Parquet; every numeric "
             "non-key column is a dimension); named after its file.")
    d.string("embeddings", "", "Several tables side by side: name=path,name=path,...")
    d.string("out", "", "Output directory.")
    d.list("splits", [], "Record splits to score, for every task: empty = the held-out "
           "splits (every split but train) where a table has a split column (stated in the "
           "output); all = every row; or a list, e.g. test or train,test.")
    d.bool("average_duplicate_genes", False, "Average the rows of a gene that a gene-level "
           "embedding table repeats (reported as a warning); default: such a table is an "
           "error naming the gene and its rows.")
    d.string("manifest", "", "Manifest CSV written by bin/fetch or "
             "bin/synth.")
    d.string("zeng_table", "", "Zeng et al. 2012 Table S2 (.xlsx): pattern, level, "
             "level_description, layer_marker, celltype_marker groups.")
    d.string("gaf", "", "GO annotations, GAF 2.x (plain or .gz; symbols or NCBIGene ids).")
    d.string("obo", "", "GO ontology (.obo) to propagate annotations up is_a edges.")
    d.list("go_aspects", ["P", "F", "C"], "GO aspects kept: P, F, C.")
    d.list("go_exclude_evidence", [], "GO evidence codes dropped, e.g. IEA.")
    d.integer("go_min_genes", 40, "Smallest GO group, in matched genes.", lower_bound=1)
    d.integer("go_max_genes", 200, "Largest GO group, in matched genes.", lower_bound=1)
    d.list("annotations", [], "Generic annotation CSVs: gene_symbol and/or entrez_id "
           "+ categorical columns, each value a group (e.g. bin/synth's annotations.csv).")
    d.list("annotation_columns", [], "Columns of --annotations to use; empty = all "
           "non-key columns.")
    d.integer("min_group_genes", 5, "Groups with fewer matched genes are skipped.",
              lower_bound=2)
    d.integer("folds", 5, "Stratified cross-validation folds.", lower_bound=2)
    d.integer("max_iter", 500, "Iteration cap of the logistic regression.",
              lower_bound=1)
    d.enum("solver", "newton-cg", ["newton-cg", "lbfgs", "newton-cholesky"],
           "scikit-learn solver of the unpenalised logistic regression.")
    d.enum("penalty", "none", ["none", "l2"], "Logistic regression penalty: none (the "
           "paper's) or l2 (C=1), well posed when a fold has fewer genes than dimensions "
           "(such set-ups are flagged without it).")
    d.integer("pca_components", 0, "Project each fold onto this many principal components "
              "of its training genes first (k < genes per fold); 0 = none.", lower_bound=0)
    d.bool("standardize_features", True, "z-score embedding dimensions inside each "
           "fold (training part's mean/std): results do not depend on the scale.")
    d.enum("join_key", "auto", ["auto", "gene_symbol", "entrez_id"],
           "Key joining embeddings to annotations; auto = the one matching more genes.")
    d.bool("common_genes", True, "Score all embeddings on the genes every one of them "
           "matches (paired comparison).")
    d.string("donor_matrix", "", "Gene x donor 0/1 assay matrix CSV, scored as "
             "embedding 'donor_matrix' (donor-bias control).")
    d.bool("donor_control", True, "With --manifest and no --donor_matrix, build the "
           "donor matrix from the manifest and score it too.")
    d.string("diagnosis_label", "diagnosis", "Manifest column labelling donors.")
    d.string("diagnosis_positive", "schizophrenia", "Value of the positive class.")
    d.string("diagnosis_negative", "control", "Value of the negative class; empty = "
             "every other value.")
    d.integer("min_donors", 40, "Diagnosis: genes assayed in fewer labelled donors "
              "are skipped.", lower_bound=2)
    d.list("demographics", ["donor_age", "pmi", "tissue_ph", "smoker", "donor_sex",
           "donor_race"],
           "Diagnosis covariates (numeric as is, others one-hot).")
    d.integer("top_genes", 20, "Rows of OUT/diagnosis_top.csv.", lower_bound=1)
    d.enum("reid_level", "image", ["image", "patch", "donor"],
           "Level re-identification runs at (patch tables are averaged up).")
    d.enum("reid_metric", "euclidean", ["euclidean", "sqeuclidean", "cosine",
           "cityblock"], "Re-identification distance.")
    d.bool("report", True, "Write figures/ and report.html for the tasks that ran.")
    d.enum("map_method", "pca", ["pca", "tsne", "umap", "auto", "none"],
           "Projection of the per-embedding gene maps in the report (tsne: nicer, "
           "~15-60 s per embedding on 2 cores; none: no maps).")
    d.integer("n_jobs", 2, "Processes scoring groups (or genes) in parallel.",
              lower_bound=1)
    # The paper's Fig 3: the patches of one gene that most and least activate a dimension.
    d.string("patch_embeddings", "", "Patch-level table from bin/embed; with "
             "--records_dir and --extreme_gene adds the extreme-patches figure.")
    d.string("records_dir", "", "TFRecord shards + index.json "
             "(from bin/extract) holding the patches of --patch_embeddings.")
    d.string("extreme_gene", "", "Gene whose extreme patches are shown.")
    d.string("profiles", "", "--task=expression: the bin/ingest --expression directory "
             "(records with the held-out test profiles, profiles.csv with labels).")
    d.string("saved_model", "", "--task=expression: the exported cic model (code + "
             "reconstruction).")
    d.string("classifier_model", "", "--task=expression: an exported cic_classifier "
             "trained on the same records (its softmax is scored too).")
    d.string("unseen_profiles", "", "--task=expression: an ingest with whole labels held "
             "out (bin/ingest --split_by=label) for the unseen-cell-type test.")
    d.string("unseen_model", "", "--task=expression: the cic model trained on "
             "--unseen_profiles.")
    d.list("noise_levels", ["0.25", "0.5", "1.0"], "--task=expression: standard deviations "
           "of the Gaussian noise added to test profiles (standardised units).")
    d.list("expression_baselines", ["pca", "nmf", "kpca_poly", "kpca_cosine", "kpca_rbf"],
           "--task=expression: reconstruction baselines at the code width.")
    d.integer("kernel_max_train", 2000, "--task=expression: at most this many training "
              "profiles fit KernelPCA.", lower_bound=10)
    d.integer("extreme_dim", -1, "Embedding dimension for the extreme-patches "
              "figure; -1 = the dimension varying most over that gene's patches.")
    d.string("attribution_model", "", "Training run RUN (model.keras) of the embeddings: "
             "the extreme-patches figure gains integrated-gradients and Grad-CAM maps per "
             "patch (ish_tf.attribution); empty = none.")
    # Attention-MIL pooling (ish_tf.evaluate.attention_mil), scored against the mean.
    d.enum("pooling", "mean", ["mean", "attention"], "How --patch_embeddings are pooled per "
           "image, gene in a donor or gene for a bag-level target: mean (the paper; the "
           "tasks' tables) or attention: gated attention-MIL scored against the mean on the "
           "same folds, writing pooling.csv and attention_weights.csv.")
    d.enum("pooling_level", "donor", ["image", "donor", "gene"], "Bags of --pooling: a "
           "section's patches, a gene's patches in one donor (one cross-validation per "
           "gene, like --task=diagnosis) or all of a gene's patches.")
    d.string("pooling_target", "", "Bag label of --pooling: a key column of "
             "--patch_embeddings, else the manifest's per-donor column; empty = "
             "--diagnosis_label (classes --diagnosis_positive/--diagnosis_negative).")
    d.integer("pooling_epochs", 60, "Training passes of the attention model per fold.",
              lower_bound=1)


def parse_named_paths(value: str) -> dict[str, str]:
    """`name=path,name=path` (or bare paths, named after the file) to an ordered dict.

    Raises:
      ValueError: a name repeats or is empty.
    """
    out: dict[str, str] = {}
    for item in config.parse_list(value):
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            name = os.path.splitext(os.path.basename(item))[0]
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--embeddings item {item!r} must be name=path")
        if name in out:
            raise ValueError(f"--embeddings names {name!r} twice")
        out[name] = path
    return out


def evaluate_config(fv):
    """Converts the evaluate flags (and --seed) into an `ish_tf.evaluate.EvaluateConfig`.

    Raises:
      ValueError: --out is empty, --embeddings is malformed, or a task lacks its inputs.
    """
    from ish_tf.evaluate import EvaluateConfig
    from ish_tf.evaluate.annotations import ScoringConfig
    from ish_tf.evaluate.diagnosis import DiagnosisConfig

    if not config.parse_list(fv.task):
        raise ValueError("--task is required: which evaluation to run\n" + TASK_HELP)
    if not fv.out:
        raise ValueError("--out is required: the directory to write results to")
    embeddings = parse_named_paths(fv.embedding)
    for name, path in parse_named_paths(fv.embeddings).items():
        if name in embeddings:
            raise ValueError(f"embedding name {name!r} given by both --embedding and --embeddings")
        embeddings[name] = path
    scoring = ScoringConfig(
        n_splits=fv.folds, seed=fv.seed, standardize=fv.standardize_features,
        max_iter=fv.max_iter, solver=fv.solver, min_genes=fv.min_group_genes,
        size_bounds={"go": (fv.go_min_genes, fv.go_max_genes)}, n_jobs=fv.n_jobs,
        penalty=fv.penalty, pca_components=fv.pca_components)
    diagnosis = DiagnosisConfig(
        label_column=fv.diagnosis_label, positive=fv.diagnosis_positive,
        negative=fv.diagnosis_negative, min_donors=fv.min_donors,
        demographics=tuple(config.parse_list(fv.demographics)), n_splits=fv.folds,
        seed=fv.seed, standardize=fv.standardize_features, max_iter=fv.max_iter,
        solver=fv.solver, n_jobs=fv.n_jobs, penalty=fv.penalty,
        pca_components=fv.pca_components)
    return EvaluateConfig(
        tasks=tuple(config.parse_list(fv.task)), embeddings=embeddings, out_dir=fv.out,
        splits=tuple(config.parse_list(fv.splits)),
        zeng_table=fv.zeng_table, gaf=fv.gaf, obo=fv.obo,
        go_aspects=tuple(config.parse_list(fv.go_aspects)),
        go_exclude_evidence=tuple(config.parse_list(fv.go_exclude_evidence)),
        annotation_tables=tuple(config.parse_list(fv.annotations)),
        annotation_columns=tuple(config.parse_list(fv.annotation_columns)),
        donor_matrix=fv.donor_matrix, manifest=fv.manifest,
        donor_control=fv.donor_control, join_key=fv.join_key,
        common_genes=fv.common_genes, scoring=scoring, diagnosis=diagnosis,
        top_genes=fv.top_genes, reid_level=fv.reid_level, reid_metric=fv.reid_metric,
        report=fv.report, map_method=fv.map_method,
        patch_embeddings=fv.patch_embeddings, records_dir=fv.records_dir,
        extreme_gene=fv.extreme_gene, extreme_dim=fv.extreme_dim,
        average_duplicate_genes=fv.average_duplicate_genes,
        attribution_model=fv.attribution_model).validate()


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_evaluate(fv)


def _usage(message: str) -> int:
    print(f"{NAME}: error: {message}", file=sys.stderr)
    return 2


def _run_pooling(fv, cfg) -> dict:
    """--pooling=attention: mean vs attention pooling on the same folds."""
    from ish_tf.cli import quiet_tensorflow_info

    quiet_tensorflow_info()  # the attention model is Keras: keep TF's start-up lines out
    from ish_tf.evaluate.attention_mil import MILConfig, run_pooling

    mil = MILConfig(epochs=fv.pooling_epochs, seed=fv.seed, n_splits=fv.folds).validate()
    return run_pooling(fv.patch_embeddings, cfg.out_dir, level=fv.pooling_level,
                       target=fv.pooling_target or fv.diagnosis_label,
                       positive=fv.diagnosis_positive, negative=fv.diagnosis_negative,
                       manifest=fv.manifest, config=mil, splits=cfg.splits)


def _flagged(n: int, total: int) -> str:
    return f"  [{n} of {total} flagged degenerate: see column 'flag']" if n else ""


def _print_summary(done: dict, seconds: float) -> None:
    tasks = [t for t in done if t != "embeddings"]
    print(f"evaluate: finished {', '.join(tasks)} in {seconds:.1f}s")
    for name, choice in done.get("embeddings", {}).get("choices", {}).items():
        print(f"  scored rows: {name}: {choice.describe()}")
        for small in choice.small_splits():
            print(f"evaluate: warning: embedding {name}: split {small}: too small to "
                  "score on its own", file=sys.stderr)
    if "annotations" in done:
        s = done["annotations"]["summary"]
        overall = s[s["category"] == "all"]
        if not len(overall):
            print("  annotations: no group could be scored (too few matched genes); see "
                  "annotations_skipped.csv")
        for _, row in overall.iterrows():
            print(f"  annotations: {row['embedding']}: mean AUC {row['mean_auc']:.3f} over "
                  f"{int(row['n_groups'])} groups, {int(row['n_significant_bh'])} significant "
                  f"(Benjamini-Hochberg FDR 5%)"
                  f"{_flagged(int(row['n_flagged']), int(row['n_groups']))}")
        results = done["annotations"]["results"]
        flags = results.loc[results["flag"].fillna("") != "", "flag"]
        if len(flags):
            print(f"evaluate: warning: {len(flags)} annotation group(s) degenerate, e.g. "
                  f"{flags.iloc[0]}", file=sys.stderr)
    if "diagnosis" in done:
        s = done["diagnosis"]["summary"]
        for _, row in s[s["features"] == "embedding"].iterrows():
            print(f"  diagnosis: {row['embedding']}: mean AUC {row['mean_auc']:.3f} over "
                  f"{int(row['n_genes'])} genes")
    if "reid" in done:
        r = done["reid"]["reid"]
        for _, row in r[r["candidates"] == "other_donor"].iterrows():
            flag = f"  [DEGENERATE: {row['flag']}]" if row.get("flag") else ""
            print(f"  reid: {row['embedding']}: rank-1 (other donors) {row['rank1']:.3f}, "
                  f"chance {row['chance']:.3f}, fold over chance "
                  f"{row['fold_over_chance']:.2f}, {int(row['n_queries'])} queries{flag}")
            if flag:
                print(f"evaluate: warning: reid {row['embedding']}: {row['flag']}",
                      file=sys.stderr)
    if "pooling" in done:
        s = done["pooling"]["scores"]
        for pooling, auc in s.groupby("pooling", sort=False)["auc"].mean().items():
            print(f"  pooling: {pooling}: mean AUC {auc:.3f} over {s['scope'].nunique()} "
                  f"scope(s)")
    for task in done.values():
        for name, path in task["written"].items():
            print(f"  {name + ':':22s}{os.path.abspath(path)}")


def main(fv, argv: list[str]) -> int:
    """Scores the embeddings; returns the exit status (0 ok, 1 bad input or failed report)."""
    from absl import logging

    from ish_tf.evaluate.run import run as run_tasks
    from ish_tf.evaluate.run import write_figures_and_report

    if "expression" in config.parse_list(fv.task):
        return main_expression(fv)
    if "plates" in config.parse_list(fv.task):
        return main_plates(fv)
    with usage_errors():
        cfg = evaluate_config(fv)
    start = time.monotonic()
    if fv.pooling == "attention" and not fv.patch_embeddings:
        return _usage("--pooling=attention needs --patch_embeddings (bin/embed's "
                      "patch_embeddings.csv)")
    try:
        done = run_tasks(cfg)
        if fv.pooling == "attention":
            done["pooling"] = _run_pooling(fv, cfg)
    except (ValueError, KeyError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    config.write_flagfile(os.path.join(cfg.out_dir, "evaluate_flags.cfg"), fv)
    status, report_path = 0, ""
    if cfg.report:
        try:
            report_path = write_figures_and_report(cfg, done)
        except Exception as e:  # noqa: BLE001 - the CSVs are written; say why the report is not
            logging.exception("report failed")
            print(f"evaluate: error: figures/report failed ({type(e).__name__}: {e}); "
                  f"the CSVs are written", file=sys.stderr)
            status = 1
    _print_summary(done, time.monotonic() - start)
    if report_path:
        print(f"  {'report:':22s}{os.path.abspath(report_path)}")
    return status


def main_expression(fv) -> int:
    """`bin/evaluate --task=expression`: 0 ok, 1 bad input."""
    from ish_tf.cli import quiet_tensorflow_info

    with usage_errors():
        if config.parse_list(fv.task) != ["expression"]:
            raise ValueError("--task=expression runs alone")
        cfg = expression_config(fv)
    quiet_tensorflow_info()
    from ish_tf.evaluate.expression import evaluate_expression

    start = time.monotonic()
    try:
        summary = evaluate_expression(cfg, log=lambda s: print(s, flush=True))
    except (ValueError, KeyError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    config.write_flagfile(os.path.join(cfg.out_dir, "evaluate_flags.cfg"), fv)
    print(f"evaluate: expression in {time.monotonic() - start:.1f}s ({summary['n_test']} test "
          f"profiles, codes of {summary['code_size']})")
    for name, r in summary["reconstruction"].items():
        print(f"  reconstruction {name:14s} MSE {r['mse']:.4f}  Pearson {r['pearson']:.3f}  "
              f"Spearman {r['spearman']:.3f}  own-profile rank-1 {r['own_rank1']:.3f}")
    chance = summary["classification_baselines"]
    for name, r in {**summary["classification"], **chance}.items():
        if r:
            print(f"  classification {name:14s} accuracy {r['accuracy']:.3f} "
                  f"({r['errors']} errors in {r['n_test']})")
    for name, path in summary["written"].items():
        print(f"  {name + ':':22s}{os.path.abspath(path)}")
    return 0


def main_plates(fv) -> int:
    """`bin/evaluate --task=plates`: 0 ok, 1 bad input."""
    from ish_tf.cli import quiet_tensorflow_info

    with usage_errors():
        if config.parse_list(fv.task) != ["plates"]:
            raise ValueError("--task=plates runs alone")
        if not (fv.saved_model and fv.records_dir and fv.out):
            raise ValueError("--task=plates needs --saved_model (a fluorescence export), "
                             "--records_dir (its plate records) and --out")
    quiet_tensorflow_info()
    from ish_tf.export.saved_model import ExportError
    from ish_tf.families.fluorescence.evaluation import evaluate_export

    start = time.monotonic()
    splits = [s for s in config.parse_list(fv.splits) if s != "all"]
    try:
        result = evaluate_export(fv.saved_model, fv.records_dir, splits, fv.out)
    except (ValueError, KeyError, OSError, ExportError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    config.write_flagfile(os.path.join(fv.out, "evaluate_flags.cfg"), fv)
    print(f"evaluate: plates in {time.monotonic() - start:.1f}s ({result['family']} export)")
    for split, m in result["splits"].items():
        rank1 = (f"  rank-1 across experiments {m['rank1_other_experiment']:.3f} (chance "
                 f"{m['rank1_chance']:.3f})" if "rank1_other_experiment" in m else "")
        print(f"  {split:10s} {m['wells']} wells  accuracy {m['accuracy']:.3f} (chance "
              f"{m['chance']:.3f})  plate-assigned {m['plate_assignment_accuracy']:.3f} "
              f"(chance {m['plate_assignment_chance']:.3f}){rank1}")
    for name, path in result["written"].items():
        print(f"  {name + ':':22s}{os.path.abspath(path)}")
    return 0


def expression_config(fv):
    """`ish_tf.evaluate.expression.ExpressionEvalConfig` from the flags."""
    from ish_tf.evaluate.expression import ExpressionEvalConfig

    return ExpressionEvalConfig(
        profiles_dir=fv.profiles, saved_model=fv.saved_model, out_dir=fv.out,
        embedding=fv.embedding, classifier_model=fv.classifier_model,
        unseen_profiles=fv.unseen_profiles, unseen_model=fv.unseen_model,
        noise_levels=tuple(float(v) for v in config.parse_list(fv.noise_levels)),
        kernel_max_train=fv.kernel_max_train,
        baselines=tuple(config.parse_list(fv.expression_baselines)), report=fv.report,
        seed=fv.seed).validate()


if __name__ == "__main__":
    run(NAME, define_flags, main, tensorflow=USES_TENSORFLOW)

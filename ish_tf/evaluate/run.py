"""Evaluation tasks as library functions: what `bin/evaluate` (and the quickstart) run.

`run(config)` runs the tasks named in an `EvaluateConfig`; the task functions take
in-memory embedding tables too, so callers with tables already loaded (the
quickstart's baselines) use the same code. Each writes its CSVs atomically under
`config.out_dir`; `write_figures_and_report` adds figures/ and report.html.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pandas as pd

from ish_tf.evaluate import report as report_module

# Bars per category in figures/auc_bars.png (GO can have hundreds of groups).
MAX_BARS_PER_CATEGORY = 12


def _write_csv(df: pd.DataFrame, path: str) -> str:
    from ish_tf.io_utils import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    return path


def load_tables(config) -> dict:
    """Reads every --embedding/--embeddings table (name -> EmbeddingTable).

    A gene-level table (one row per gene: no image, patch or donor keys) that repeats a
    gene is an error naming the table, the gene and its rows, unless
    `config.average_duplicate_genes`: then the rows are averaged and a warning says so.

    Raises:
      EmbeddingTableError: an unreadable table, or a repeated gene (see above).
    """
    from absl import logging

    from ish_tf.data.embeddings import (
        EmbeddingTableError,
        average_duplicate_genes,
        describe_duplicates,
        duplicate_genes,
        read_embedding_table,
    )

    tables = {}
    for name, path in config.embeddings.items():
        table = read_embedding_table(path)
        dups = duplicate_genes(table)
        if dups:
            where = describe_duplicates(table, dups)
            if not getattr(config, "average_duplicate_genes", False):
                raise EmbeddingTableError(
                    f"{path}: gene-level table (embedding '{name}') repeats "
                    f"{len(dups)} gene(s): {where}; a gene-level table has one row per gene: "
                    "remove the duplicates, or pass --average_duplicate_genes to average them")
            table = average_duplicate_genes(table)
            note = (f"{path}: averaged the rows of {len(dups)} repeated gene(s) "
                    f"(--average_duplicate_genes): {where}")
            logging.warning("%s", note)
            print(f"evaluate: warning: {note}", file=sys.stderr)
        tables[name] = table
    return tables


def apply_splits(config, tables: dict) -> tuple[dict, dict]:
    """The rows of each table to score (`ish_tf.evaluate.splits.select_splits`).

    Returns:
      (name -> kept table, name -> SplitChoice).

    Raises:
      SplitSelectionError: a --splits choice a table cannot meet.
    """
    from ish_tf.evaluate.splits import select_splits

    kept, choices = {}, {}
    for name, table in tables.items():
        kept[name], choices[name] = select_splits(table, tuple(getattr(config, "splits", ())),
                                                  name)
    return kept, choices


def _embed_summary(path: str) -> dict:
    """embed_summary.json beside a table written by bin/embed, or {}."""
    import json

    summary = os.path.join(os.path.dirname(os.path.abspath(path)), "embed_summary.json")
    try:
        with open(summary) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _level_of(table) -> str:
    cols = set(map(str, table.keys.columns))
    if "patch_index" in cols:
        return "patch"
    if "image_id" in cols:
        return "image"
    if "donor_id" in cols and "gene_symbol" in cols:
        return "(gene, donor)"
    if cols & {"gene_symbol", "entrez_id"}:
        return "gene"
    return "?"


def describe_embeddings(config, tables: dict, choices: dict | None = None) -> pd.DataFrame:
    """One row per embedding: its file, level, rows, width, genes, donors, splits, model."""
    rows = []
    for name, table in tables.items():
        path = config.embeddings.get(name, "")
        keys = table.keys
        choice = (choices or {}).get(name)
        summary = _embed_summary(path) if path else {}
        model = summary.get("saved_model", "")
        if model and summary.get("family"):
            model = f"{summary['family']}: {model}"
        rows.append({
            "embedding": name, "file": path or "(built in memory)", "level": _level_of(table),
            "rows": len(table),
            "rows_in_file": choice.rows_total if choice is not None else len(table),
            "dimensions": table.dim,
            "genes": int(keys["gene_symbol"].nunique()) if "gene_symbol" in keys else np.nan,
            "donors": int(keys["donor_id"].nunique()) if "donor_id" in keys else np.nan,
            "splits": choice.describe() if choice is not None else "not selected (all rows)",
            "model": model})
    return pd.DataFrame(rows)


def flag_warnings(df: pd.DataFrame, what: str, label_columns: tuple[str, ...]) -> list[str]:
    """One line per flagged row of a results table: "<what> <labels>: <flag>"."""
    if df is None or "flag" not in df.columns or not len(df):
        return []
    flagged = df[df["flag"].fillna("").astype(str) != ""]
    out = []
    for _, row in flagged.iterrows():
        labels = " / ".join(str(row[c]) for c in label_columns if c in row.index)
        out.append(f"{what} {labels}: {row['flag']}")
    return out


def load_annotations(config) -> list:
    """The annotation sources named by the config (Zeng, GO, generic tables)."""
    from ish_tf.evaluate import annotations, go, zeng

    sources = []
    if config.zeng_table:
        sources.append(zeng.load_zeng(config.zeng_table))
    if config.gaf:
        sources.append(go.load_go(config.gaf, config.obo or None, aspects=config.go_aspects,
                                  exclude_evidence=config.go_exclude_evidence))
    for path in config.annotation_tables:
        sources.append(annotations.read_annotation_table(path, list(config.annotation_columns)
                                                         or None))
    return sources


def donor_control_table(config):
    """The donor matrix to score as an embedding, or None."""
    from ish_tf.data.manifest import read_manifest
    from ish_tf.evaluate import donor

    if config.donor_matrix:
        return donor.read_donor_matrix(config.donor_matrix)
    if config.manifest and config.donor_control:
        return donor.donor_matrix_from_manifest(read_manifest(config.manifest), config.manifest)
    return None


def run_annotations(config, tables: dict) -> dict:
    """Annotation task: writes the CSVs; returns paths and frames for figures and report."""
    from ish_tf.evaluate import annotations, compare, donor

    sources = load_annotations(config)
    tables = dict(tables)
    control = donor_control_table(config)
    if control is not None:
        if donor.NAME in tables:
            raise ValueError(f"embedding name '{donor.NAME}' is reserved for the donor matrix")
        tables[donor.NAME] = control
    results, skipped, matches = annotations.evaluate_many(
        tables, sources, config.scoring, key=config.join_key, common_genes=config.common_genes)
    out = config.out_dir
    summary = annotations.summarize(results, alpha=getattr(config.scoring, "alpha", 0.05))
    written = {
        "annotations": _write_csv(results, os.path.join(out, "annotations.csv")),
        "annotations_summary": _write_csv(summary, os.path.join(out, "annotations_summary.csv")),
        "annotations_skipped": _write_csv(skipped, os.path.join(out, "annotations_skipped.csv")),
        "gene_matches": _write_csv(matches, os.path.join(out, "gene_matches.csv")),
    }
    wide = compare.wide_table(results) if len(results) else pd.DataFrame()
    written["annotations_wide"] = _write_csv(wide, os.path.join(out, "annotations_wide.csv"))
    pairs = pd.DataFrame()
    if results["embedding"].nunique() > 1:
        pairs = compare.compare_pairs(results)
        written["comparisons"] = _write_csv(pairs, os.path.join(out, "comparisons.csv"))
    return {"written": written, "results": results, "summary": summary, "wide": wide,
            "pairs": pairs, "matches": matches, "skipped": skipped, "sources": sources,
            "tables": tables}


def run_diagnosis(config, tables: dict) -> dict:
    """Diagnosis task for every embedding; writes the CSVs and returns frames."""
    from ish_tf.data.manifest import read_manifest
    from ish_tf.evaluate import diagnosis

    manifest = read_manifest(config.manifest)
    dcfg = config.diagnosis
    labels = diagnosis.donor_labels(manifest, dcfg.label_column, dcfg.positive, dcfg.negative,
                                    source=config.manifest)
    demo_cols = tuple(c for c in dcfg.demographics if c != dcfg.label_column)
    demo = diagnosis.donor_demographics(manifest, demo_cols, source=config.manifest)
    per_gene, skipped, summaries = [], [], []
    for name, table in tables.items():
        donor_table = diagnosis.donor_level_table(table, manifest)
        g, s = diagnosis.predict_diagnosis(donor_table, labels, demo, dcfg)
        g.insert(0, "embedding", name)
        s.insert(0, "embedding", name)
        summ = diagnosis.summarize_diagnosis(g)
        summ.insert(0, "embedding", name)
        per_gene.append(g)
        skipped.append(s)
        summaries.append(summ)
    per_gene = pd.concat(per_gene, ignore_index=True)
    top = per_gene.groupby("embedding", sort=False).head(config.top_genes)
    summary = pd.concat(summaries, ignore_index=True)
    out = config.out_dir
    written = {
        "diagnosis": _write_csv(per_gene, os.path.join(out, "diagnosis.csv")),
        "diagnosis_top": _write_csv(top, os.path.join(out, "diagnosis_top.csv")),
        "diagnosis_summary": _write_csv(summary, os.path.join(out, "diagnosis_summary.csv")),
        "diagnosis_skipped": _write_csv(pd.concat(skipped, ignore_index=True),
                                        os.path.join(out, "diagnosis_skipped.csv")),
    }
    return {"written": written, "per_gene": per_gene, "top": top, "summary": summary,
            "labels": labels}


def run_reid(config, tables: dict, choices: dict | None = None) -> dict:
    """Re-identification of every embedding; writes OUT/reid.csv.

    Args:
      config: the EvaluateConfig.
      tables: name -> table (already restricted to the splits to score).
      choices: name -> SplitChoice; adds a `splits` column saying which were scored.
    """
    from ish_tf.evaluate import reid

    df = reid.reid_table(tables, level=config.reid_level, metric=config.reid_metric)
    if choices:
        df.insert(2, "splits", [",".join(choices[n].splits) or "all"
                                for n in df["embedding"]])
    return {"written": {"reid": _write_csv(df, os.path.join(config.out_dir, "reid.csv"))},
            "reid": df}


def _embedding_maps(ann: dict, fig_dir: str, method: str) -> list[tuple[str, str]]:
    """One 2-D map per embedding, genes coloured by the first categorical annotation."""
    from ish_tf.evaluate import annotations, figures

    source = ann["sources"][0]
    cats = list(dict.fromkeys(source.groups["category"]))
    category = "pattern" if "pattern" in cats else cats[0]
    out = []
    for name, table in ann["tables"].items():
        aligned = annotations.align(table, source)
        labels = annotations.category_labels(aligned, source, category)
        path = os.path.join(fig_dir, f"map_{name}.png")
        caption = figures.plot_embedding_map(aligned.values, labels,
                                             f"{name}: genes by {category}", path,
                                             method=method)
        out.append((caption, path))
    return out


def _bar_frame(results: pd.DataFrame, max_groups: int = MAX_BARS_PER_CATEGORY) -> pd.DataFrame:
    """Results shaped for `figures.plot_auc_bars` (one panel per category, a bar per group).

    That plot calls the panel "annotation" and the bar "category", the reverse of our
    columns. Categories with many groups (GO) keep their `max_groups` largest groups.
    """
    sizes = results.groupby(["category", "annotation"], sort=False)["n_genes"].max()
    keep = (sizes.sort_values(ascending=False, kind="stable")
            .groupby(level="category", sort=False).head(max_groups).index)
    rows = results.set_index(["category", "annotation"]).index.isin(keep)
    sub = results.loc[rows, ["category", "annotation", "auc", "embedding"]]
    return sub.rename(columns={"category": "annotation", "annotation": "category"})


def write_figures_and_report(config, done: dict, intro: report_module.Section | None = None) -> str:
    """Figures for whatever ran and OUT/report.html; returns the report path.

    Args:
      config: the EvaluateConfig.
      done: what `run` (or the task functions) returned.
      intro: an optional first section (e.g. how the quickstart produced the embeddings).
    """
    from ish_tf.evaluate import figures, report

    fig_dir = os.path.join(config.out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    settings = {"seed": config.scoring.seed, "folds": config.scoring.n_splits,
                "standardize_features": config.scoring.standardize,
                "solver": config.scoring.solver, "max_iter": config.scoring.max_iter}
    sections = [intro] if intro is not None else []
    from ish_tf.evaluate import donor, glossary

    if "embeddings" in done and len(done["embeddings"]["table"]):
        info = done["embeddings"]["table"]
        small = [f"embedding {n}: split {x}" for n, c in done["embeddings"]["choices"].items()
                 for x in c.small_splits()]
        sections.append(report.Section(
            "Embeddings",
            text=("The tables scored, what one row of each is, and which of its rows were "
                  "scored. By default only held-out splits are scored where a table has a "
                  "split column (genes seen in training measure memory, not "
                  "generalisation); --splits=all or --splits=a,b chooses otherwise."),
            tables=[("Embedding tables", info)], warnings=small,
            glossary=glossary.define(info.columns)))
    if "annotations" in done:
        ann = done["annotations"]
        figs = []
        if len(ann["results"]):
            path = os.path.join(fig_dir, "auc_bars.png")
            figs.append((figures.plot_auc_bars(_bar_frame(ann["results"]), path), path))
            if config.map_method != "none":
                figs += _embedding_maps(ann, fig_dir, config.map_method)
        tables = [("Mean AUC per embedding and category", ann["summary"]),
                  ("Genes matched per embedding and annotation source", ann["matches"]),
                  ("AUC per group, one column per embedding", ann["wide"])]
        if len(ann["pairs"]):
            tables.append(("Paired comparisons across groups (Wilcoxon signed-rank)",
                           ann["pairs"]))
        names = list(dict.fromkeys(ann["results"]["embedding"])) if len(ann["results"]) else []
        scfg = config.scoring
        model = ("unpenalised logistic regression (the paper's)"
                 if getattr(scfg, "penalty", "none") == "none"
                 else f"{scfg.penalty}-penalised logistic regression (C = 1)")
        if getattr(scfg, "pca_components", 0):
            model += f" on the first {scfg.pca_components} principal components of each fold"
        text = (f"Stratified, shuffled {scfg.n_splits}-fold {model} per binary gene group; "
                "AUC, AUC-PR and F1 are fold means, max_p the largest one-sided "
                "Mann-Whitney U p-value over folds. Significance counts "
                "(n_significant_bh) use the Benjamini-Hochberg correction over all groups "
                f"of an embedding, at a false discovery rate of {getattr(scfg, 'alpha', 0.05):g}. "
                "Rows with a flag are degenerate set-ups (e.g. more dimensions than "
                "training genes in a fold without a penalty): their AUC is not a result.")
        if donor.NAME in names:
            text += (" 'donor_matrix' scores the assay design alone (which donors each gene "
                     "was run in): an embedding beats donor bias only where it beats that row.")
        if len(ann["results"]):
            text += (f" The bar chart shows at most {MAX_BARS_PER_CATEGORY} groups per "
                     "category (the largest); annotations.csv has all.")
        else:
            text += (" No group could be scored (too few matched genes): see "
                     "annotations_skipped.csv.")
        shown = [c for _, df in tables for c in df.columns]
        sections.append(report.Section(
            "Annotation prediction", text=text, tables=tables, figures=figs,
            warnings=flag_warnings(ann["results"], "annotation",
                                   ("embedding", "category", "annotation")),
            glossary=glossary.define(list(dict.fromkeys(shown + ["flag"])), names),
            settings={**settings, "min_group_genes": config.scoring.min_genes,
                      "go_bounds": config.scoring.size_bounds.get("go"),
                      "penalty": getattr(scfg, "penalty", "none"),
                      "pca_components": getattr(scfg, "pca_components", 0),
                      "join_key": config.join_key, "common_genes": config.common_genes}))
    if "diagnosis" in done:
        d = done["diagnosis"]
        dcfg = config.diagnosis
        sections.append(report.Section(
            "Diagnosis prediction",
            text=(f"Per gene, donor-level mean embeddings predict {dcfg.label_column} "
                  f"({dcfg.positive} vs {dcfg.negative or 'rest'}); compared with "
                  f"demographics alone, demographics + embedding, and a random embedding."),
            tables=[("Mean AUC over genes per feature set", d["summary"]),
                    (f"Top {config.top_genes} genes by embedding AUC", d["top"])],
            warnings=flag_warnings(d["per_gene"], "diagnosis", ("embedding", "gene_symbol")),
            glossary=glossary.define(list(dict.fromkeys(
                list(d["summary"].columns) + list(d["top"].columns)))),
            settings={**settings, "min_donors": dcfg.min_donors,
                      "demographics": ",".join(dcfg.demographics)}))
    if "reid" in done:
        r = done["reid"]["reid"]
        path = os.path.join(fig_dir, "reid_bars.png")
        sections.append(report.Section(
            "Gene re-identification",
            text="Rank-1 of the nearest neighbour among images of other donors (and all, "
                 "same donor), with the exact chance level; fold over chance is rank-1 "
                 "divided by chance (answerable queries). Rows with a flag (fewer than 2 "
                 "genes or queries, chance >= 0.5) say little whatever their rank-1.",
            tables=[("Re-identification", r)],
            warnings=flag_warnings(r, "re-identification", ("embedding", "candidates")),
            glossary=glossary.define(r.columns),
            figures=[(figures.plot_reid_bars(r, path), path)],
            settings={"level": config.reid_level, "metric": config.reid_metric}))
    if config.extreme_gene:
        sections.append(extreme_patches_section(config, fig_dir))
    inputs = {f"embedding {k}": v for k, v in config.embeddings.items()}
    for key in ("zeng_table", "gaf", "obo", "donor_matrix", "manifest"):
        if getattr(config, key):
            inputs[key] = getattr(config, key)
    for i, path in enumerate(config.annotation_tables):
        inputs[f"annotations {i + 1}"] = path
    return report.write_report(config.out_dir, sections, title="ish_tf evaluation",
                               inputs=inputs)


def run(config) -> dict:
    """Runs the configured tasks; returns {task: {"written": {name: path}, ...frames}}.

    The tables are first restricted to the splits to score (`apply_splits`); the
    entry "embeddings" says which rows of each table were scored (its `table`, and
    `choices`: name -> SplitChoice).

    Raises:
      ValueError: bad inputs (the message names the file, column or flag).
    """
    os.makedirs(config.out_dir, exist_ok=True)
    tables, choices = apply_splits(config, load_tables(config))
    done = {"embeddings": {"written": {}, "choices": choices,
                           "table": describe_embeddings(config, tables, choices)}}
    if "annotations" in config.tasks:
        done["annotations"] = run_annotations(config, tables)
    if "diagnosis" in config.tasks:
        done["diagnosis"] = run_diagnosis(config, tables)
    if "reid" in config.tasks:
        done["reid"] = run_reid(config, tables, choices)
    return done


def most_varying_dimension(table, gene: str) -> int:
    """The embedding dimension with the largest variance over one gene's rows."""
    import numpy as np

    rows = (table.keys["gene_symbol"].astype(str) == gene).to_numpy()
    if not rows.any():
        raise ValueError(f"{table.source}: gene {gene!r} has no rows")
    return int(np.argmax(table.values[rows].var(axis=0)))


def extreme_patches_section(config, fig_dir: str):
    """The paper's Fig 3 for --extreme_gene: patches that most and least activate a dimension."""
    from ish_tf.data.embeddings import read_embedding_table
    from ish_tf.evaluate import figures

    table = read_embedding_table(config.patch_embeddings,
                                 require=("image_id", "patch_index", "gene_symbol"))
    dim = config.extreme_dim if config.extreme_dim >= 0 else most_varying_dimension(
        table, config.extreme_gene)
    path = os.path.join(fig_dir, f"extreme_{config.extreme_gene}_dim{dim}.png")
    caption = figures.plot_extreme_patches(config.records_dir, table, config.extreme_gene, dim, path)
    shown = [(caption, path)]
    if getattr(config, "attribution_model", ""):  # a heat map per patch (ish_tf.attribution)
        from ish_tf.attribution import extreme_patch_maps

        maps_path = os.path.join(fig_dir, f"extreme_{config.extreme_gene}_dim{dim}_maps.png")
        shown.append((extreme_patch_maps(config.records_dir, table, config.extreme_gene, dim,
                                         config.attribution_model, maps_path), maps_path))
    return report_module.Section(
        "Patches that most and least activate a dimension",
        text=(f"Gene {config.extreme_gene}, embedding dimension {dim}"
              f"{' (the one varying most over its patches)' if config.extreme_dim < 0 else ''}; "
              "patches read back from the TFRecords."),
        figures=shown,
        settings={"patch_embeddings": config.patch_embeddings, "records_dir": config.records_dir})

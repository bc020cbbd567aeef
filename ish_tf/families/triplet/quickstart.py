"""The quickstart: gene re-identification end to end on a synthetic dataset.

synthetic sections -> masks -> patches -> TFRecords -> train (small CNN, triplet loss)
-> SavedModel export -> embed (through the served model) -> rank-1 on held-out genes
-> annotation prediction -> report.html + summary.json.

Every step calls the same library function as its `bin/` command and writes to the
same files, so the work directory can be inspected, and any stage rerun, with the
ordinary commands. Each stage resumes: rerunning the quickstart after an interruption
continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable

import numpy as np
import pandas as pd

from ish_tf.data.embeddings import EmbeddingTable, aggregate, read_embedding_table
from ish_tf.io_utils import atomic_write_text


@dataclasses.dataclass
class QuickstartConfig:
    """The quickstart's stages, each with its own stage config.

    Paths inside the stage configs are replaced by ones under `workdir`.
    """

    workdir: str
    synth: object  # ish_tf.data.synthetic.SynthConfig
    extract: object  # ish_tf.data.patches.ExtractConfig
    model: object  # ish_tf.families.ModelConfig
    train: object  # ish_tf.train.TrainConfig
    embed_batch_size: int = 128
    eval_split: str = "test"
    seed: int = 0

    def with_workdir_paths(self) -> QuickstartConfig:
        """A copy whose stage paths all point below `workdir`."""
        p = quickstart_paths(self.workdir)
        return dataclasses.replace(
            self,
            synth=dataclasses.replace(self.synth, out_dir=p["data"]),
            extract=dataclasses.replace(self.extract, manifest=p["manifest"], out_dir=p["records"]),
            train=dataclasses.replace(self.train, run_dir=p["run"], records_dir=p["records"]),
        )


def quickstart_paths(workdir: str) -> dict[str, str]:
    """Where each stage writes, below the work directory."""
    j = lambda *a: os.path.join(workdir, *a)  # noqa: E731
    return {
        "data": j("data"), "manifest": j("data", "manifest.csv"),
        "annotations": j("data", "annotations.csv"), "records": j("records"),
        "run": j("run"), "untrained_run": j("untrained"),
        "export": j("export", "triplet"), "export_untrained": j("export", "untrained"),
        "embeddings": j("embeddings"), "evaluation": j("evaluation"),
        "summary": j("summary.json"),
    }


def _export_is_current(export_base: str, model_path: str) -> str | None:
    """The newest export version if it was written after `model_path`, else None."""
    from ish_tf.export import latest_version

    version = latest_version(export_base) if os.path.isdir(export_base) else None
    if version is None:
        return None
    path = os.path.join(export_base, str(version))
    return path if os.path.getmtime(path) >= os.path.getmtime(model_path) else None


def export_model(model_dir: str, export_base: str) -> str:
    """Exports RUN/model.keras unless an export newer than it exists; returns the version dir."""
    from ish_tf.export import export_run

    current = _export_is_current(export_base, os.path.join(model_dir, "model.keras"))
    return current or export_run(model_dir, export_base, keep=2)


def save_untrained_model(model_config, run_dir: str) -> str:
    """Builds the same architecture with the same seed and no training (the baseline)."""
    import keras

    from ish_tf.families import build_model
    from ish_tf.train.trainer import save_keras_model

    path = os.path.join(run_dir, "model.keras")
    if os.path.exists(path):
        return path
    os.makedirs(run_dir, exist_ok=True)
    keras.utils.set_random_seed(model_config.seed or 0)
    save_keras_model(build_model(model_config), path)
    atomic_write_text(os.path.join(run_dir, "model_config.json"), model_config.to_json() + "\n")
    return path


def _tables_are_current(out_dir: str, export_dir: str) -> bool:
    """Whether bin/embed already wrote every table from this export (resume)."""
    files = [os.path.join(out_dir, f"{level}_embeddings.csv") for level in ("patch", "image", "gene")]
    return all(os.path.exists(f) and os.path.getmtime(f) >= os.path.getmtime(export_dir)
               for f in files)


def _first_gene(table: EmbeddingTable, split: str) -> str:
    """The alphabetically first gene of a split (the quickstart's Fig 3 gene)."""
    return str(sorted(_split_rows(table, split).keys["gene_symbol"].astype(str).unique())[0])


def write_gene_projector(logdir: str, gene_table: EmbeddingTable, annotations_csv: str) -> int:
    """TensorBoard projector of gene-level embeddings, labelled by gene and its annotations."""
    from ish_tf.train.tensorboard import write_projector

    keys = gene_table.keys[["gene_symbol"]].astype(str)
    if os.path.exists(annotations_csv):
        ann = pd.read_csv(annotations_csv, dtype=str)
        cols = [c for c in ("pattern", "level", "group_name") if c in ann.columns]
        keys = keys.merge(ann[["gene_symbol"] + cols], on="gene_symbol", how="left").fillna("")
    labels = {c: keys[c].tolist() for c in keys.columns}
    return write_projector(logdir, gene_table.values, labels)


def random_like(table: EmbeddingTable, dim: int, seed: int) -> EmbeddingTable:
    """Random-embedding baseline: i.i.d. normal values with the same keys (rows)."""
    rng = np.random.default_rng(seed)
    return EmbeddingTable(table.keys.copy(), rng.standard_normal((len(table), dim)).astype(np.float32),
                          source="random")


def _split_rows(table: EmbeddingTable, split: str) -> EmbeddingTable:
    keep = (table.keys["split"].astype(str) == split).to_numpy()
    if not keep.any():
        raise ValueError(f"{table.source}: no rows of split {split!r}")
    return EmbeddingTable(table.keys[keep].reset_index(drop=True), table.values[keep], table.source)


def run_quickstart(cfg: QuickstartConfig, log: Callable[[str], None] = print) -> dict:
    """Runs every stage; returns (and writes to WORKDIR/summary.json) the summary.

    Returns:
      A dict with at least {"rank1": {"trained", "untrained", "random"}} (other-donor,
      image-level rank-1 on the held-out test genes), the chance level, the paths of
      the SavedModel and of the results, and per-stage wall times.
    """
    cfg = cfg.with_workdir_paths()
    paths = quickstart_paths(cfg.workdir)
    os.makedirs(cfg.workdir, exist_ok=True)
    times: dict[str, float] = {}

    n_stages = 7  # the `with stage(...)` blocks below

    def stage(name: str):
        class _Timer:
            def __enter__(self):
                # Stage k of n, and the time so far: each long stage draws its own
                # progress (extract, train, embed, reid) with counts and ETA.
                elapsed = sum(times.values())
                log(f"[quickstart {len(times) + 1}/{n_stages}] {name} ..."
                    + (f" ({elapsed:.0f} s so far)" if times else ""))
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                times[name] = round(time.perf_counter() - self.t, 1)
                if exc[0] is None:
                    log(f"[quickstart {len(times)}/{n_stages}] {name} done in "
                        f"{times[name]:.1f} s")
        return _Timer()

    with stage("synthetic dataset"):
        from ish_tf.data.manifest import summarize
        from ish_tf.data.synthetic import generate_dataset

        manifest = generate_dataset(cfg.synth)
        data_summary = summarize(manifest)
        log(f"  {data_summary['images']} images, {data_summary['genes']} genes, "
            f"{data_summary['donors']} donors -> {paths['manifest']}")

    with stage("masks, patches and TFRecords"):
        from ish_tf.data.patches import run_extract

        extract_summary = run_extract(cfg.extract)
        per_split = {s: v for s, v in extract_summary.get("splits", {}).items()}
        for split, counts in per_split.items():
            log(f"  {split}: {counts}")

    with stage("training"):
        from ish_tf.families import make_task
        from ish_tf.train.trainer import train

        result = train(make_task(cfg.model, cfg.train), cfg.train)
        log(f"  step {result.step}, loss {result.loss:.4f}, {result.images_per_sec:.0f} images/s")

    with stage("export"):
        trained_export = export_model(paths["run"], paths["export"])
        save_untrained_model(cfg.model, paths["untrained_run"])
        untrained_export = export_model(paths["untrained_run"], paths["export_untrained"])
        log(f"  SavedModel: {trained_export}")

    with stage("embedding through the SavedModel"):
        from ish_tf.embed import EmbedConfig, embed_records

        tables = {}
        for name, export in (("trained", trained_export), ("untrained", untrained_export)):
            out = os.path.join(paths["embeddings"], name)
            if not _tables_are_current(out, export):
                embed_records(EmbedConfig(saved_model=export, records_dir=paths["records"],
                                          out_dir=out, batch_size=cfg.embed_batch_size),
                              desc=f"embed ({name})")
            tables[name] = {level: read_embedding_table(os.path.join(out, f"{level}_embeddings.csv"))
                            for level in ("patch", "image", "gene")}
        patch = tables["trained"]["patch"]
        rnd_patch = random_like(patch, patch.dim, cfg.seed)
        tables["random"] = {"patch": rnd_patch, "image": aggregate(rnd_patch, ("image_id",)),
                            "gene": aggregate(rnd_patch, ("gene_symbol",))}

        write_gene_projector(os.path.join(paths["run"], "logs", "projector"),
                             tables["trained"]["gene"], paths["annotations"])

    with stage("re-identification on held-out genes"):
        from ish_tf.evaluate.reid import reid_table

        image_tables = {name: _split_rows(t["image"], cfg.eval_split) for name, t in tables.items()}
        reid = reid_table(image_tables, level="image")
        reid.insert(2, "splits", cfg.eval_split)  # as bin/evaluate --splits=<eval_split> says
        os.makedirs(paths["evaluation"], exist_ok=True)
        reid_path = os.path.join(paths["evaluation"], "reid.csv")
        from ish_tf.io_utils import atomic_path

        with atomic_path(reid_path) as tmp:
            reid.to_csv(tmp, index=False, float_format="%.4f")
        other = reid[reid["candidates"] == "other_donor"].set_index("embedding")
        log(format_reid(reid))

    with stage("annotation prediction and report"):
        report_path = evaluate_and_report(cfg, paths, tables, reid)

    summary = {
        "rank1": {name: float(other.loc[name, "rank1"]) for name in ("trained", "untrained", "random")},
        "chance": float(other.loc["trained", "chance"]),
        "rank1_answerable": {n: float(other.loc[n, "rank1_answerable"]) for n in other.index},
        "map": {n: float(other.loc[n, "map"]) for n in other.index},
        "eval_split": cfg.eval_split,
        "n_queries": int(other.loc["trained", "n_queries"]),
        "dataset": data_summary,
        "saved_model": os.path.abspath(trained_export),
        "paths": {
            "workdir": os.path.abspath(cfg.workdir), "manifest": os.path.abspath(paths["manifest"]),
            "records": os.path.abspath(paths["records"]), "run": os.path.abspath(paths["run"]),
            "embeddings": os.path.abspath(paths["embeddings"]), "reid": os.path.abspath(reid_path),
            "report": os.path.abspath(report_path) if report_path else "",
        },
        "train": {"steps": result.step, "loss": result.loss,
                  "images_per_sec": result.images_per_sec},
        "seconds": times,
    }
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2) + "\n")
    return summary


def format_reid(reid: pd.DataFrame) -> str:
    """A plain-text table of rank-1 per embedding and candidate set."""
    wide = reid.pivot(index="embedding", columns="candidates", values="rank1")
    chance = reid.pivot(index="embedding", columns="candidates", values="chance").iloc[0]
    cols = [c for c in ("other_donor", "all", "same_donor") if c in wide.columns]
    lines = [f"  {'rank-1':<12}" + "".join(f"{c:>13}" for c in cols)]
    for name in ("trained", "untrained", "random"):
        if name in wide.index:
            lines.append(f"  {name:<12}" + "".join(f"{wide.loc[name, c]:>13.3f}" for c in cols))
    lines.append(f"  {'chance':<12}" + "".join(f"{chance[c]:>13.3f}" for c in cols))
    return "\n".join(lines)


def evaluate_and_report(cfg: QuickstartConfig, paths: dict[str, str], tables: dict,
                        reid: pd.DataFrame) -> str:
    """Annotation prediction from gene-level embeddings, figures and report.html.

    The synthetic annotation table (level, pattern, group, layer marker, cell type) is
    scored like the Zeng et al. table on real data. All genes are used, since 5-fold
    cross-validation needs more genes than the held-out split has; the report says so.
    """
    from ish_tf.evaluate import EvaluateConfig
    from ish_tf.evaluate.annotations import ScoringConfig
    from ish_tf.evaluate.run import (
        apply_splits,
        describe_embeddings,
        run_annotations,
        write_figures_and_report,
    )

    ecfg = EvaluateConfig(
        tasks=("annotations", "reid"), embeddings={
            name: os.path.join(paths["embeddings"], name, "gene_embeddings.csv")
            for name in ("trained", "untrained")},
        out_dir=paths["evaluation"], splits=("all",), annotation_tables=(paths["annotations"],),
        annotation_columns=("level", "pattern", "group_name", "layer_marker", "cell_type"),
        scoring=ScoringConfig(seed=cfg.seed), reid_level="image",
        patch_embeddings=os.path.join(paths["embeddings"], "trained", "patch_embeddings.csv"),
        records_dir=paths["records"], extreme_gene=_first_gene(tables["trained"]["image"],
                                                               cfg.eval_split))
    from ish_tf.evaluate.report import Section

    # Annotations score every gene (--splits=all, said below and in the Embeddings table);
    # re-identification was scored on the held-out split alone (`run_quickstart`).
    gene_tables, choices = apply_splits(ecfg, {name: t["gene"] for name, t in tables.items()})
    done = {"embeddings": {"written": {}, "choices": choices,
                           "table": describe_embeddings(ecfg, gene_tables, choices)},
            "annotations": run_annotations(ecfg, gene_tables), "reid": {"reid": reid}}
    intro = Section(
        "About this run",
        text=("bin/quickstart on a synthetic dataset: a small CNN trained with a triplet loss "
              f"(batch-all mining) on the training genes' patches, exported as a SavedModel, "
              "and every patch embedded through that SavedModel. 'untrained' is the same "
              "architecture with the same seed and no training; 'random' draws i.i.d. normal "
              "vectors per patch. Re-identification is scored on the held-out "
              f"{cfg.eval_split} genes only (genes never seen in training). Annotation "
              "prediction uses every gene, training genes included, because 5-fold "
              "cross-validation needs more genes than the held-out split has: read it as a "
              "check of the evaluation stack, not as a held-out result."),
        settings={"workdir": os.path.abspath(cfg.workdir), "steps": cfg.train.steps,
                  "P": cfg.model.family.P, "K": cfg.model.family.K,
                  "mining": cfg.model.family.mining,
                  "learning_rate": cfg.train.learning_rate, "backbone": cfg.model.family.backbone,
                  "input_size": cfg.model.input_size, "seed": cfg.seed})
    return write_figures_and_report(ecfg, done, intro=intro)

"""Embedding evaluation: annotation and GO prediction, donor-bias control, comparisons,
diagnosis prediction and re-identification (`bin/evaluate`).

Inputs are embedding tables keyed by gene_symbol and/or entrez_id (and donor_id,
image_id for donor- and image-level tasks), read with
`ish_tf.data.embeddings.read_embedding_table`, so the suite runs on embeddings this
package did not make.

Modules:
  annotations: cross-validated logistic regression per binary gene group.
  zeng: Zeng et al. 2012 Table S2 groups; go: GAF/OBO groups.
  donor: the gene x donor assay matrix, scored like an embedding.
  compare: several embeddings side by side, paired tests across groups.
  diagnosis: per-gene donor-level diagnosis prediction.
  reid, figures, report: re-identification, plots, the HTML report.
"""

from __future__ import annotations

import dataclasses

from ish_tf.evaluate.annotations import ScoringConfig
from ish_tf.evaluate.diagnosis import DiagnosisConfig

TASKS: tuple[str, ...] = ("annotations", "diagnosis", "reid")


@dataclasses.dataclass
class EvaluateConfig:
    """Everything `bin/evaluate` needs (built from flags by `ish_tf.cli.evaluate.evaluate_config`).

    Attributes:
      tasks: subset of TASKS to run.
      embeddings: embedding name -> table path (CSV, Parquet or .h5ad), in order.
      splits: the record splits to score (`ish_tf.evaluate.splits`): () = the held-out
        splits (every split but train) where a table has a split column, ("all",) =
        every row, else the splits named.
      out_dir: where CSVs, figures/ and report.html go.
      zeng_table: Zeng et al. 2012 Table S2 .xlsx, or "".
      gaf, obo: GO annotation file and ontology (for is_a propagation), or "".
      go_aspects: GO aspects kept (P, F, C).
      go_exclude_evidence: evidence codes dropped (e.g. IEA).
      annotation_tables: generic annotation CSVs (gene_symbol + categorical columns).
      annotation_columns: columns of those tables to use (empty = all non-key columns).
      donor_matrix: gene x donor 0/1 matrix CSV, scored as embedding "donor_matrix".
      manifest: manifest CSV: diagnosis labels and demographics, and the donor matrix
        when `donor_matrix` is empty and `donor_control` is on.
      donor_control: add the donor matrix from the manifest to the annotation task.
      join_key: auto, gene_symbol or entrez_id.
      common_genes: score every embedding on the genes all of them match.
      scoring: annotation scoring settings.
      diagnosis: diagnosis settings.
      top_genes: rows of diagnosis_top.csv.
      reid_level: image, patch or donor.
      reid_metric: distance of re-identification.
      report: write figures and OUT/report.html.
      map_method: projection of the gene maps (pca, tsne, umap, auto) or "none".
      patch_embeddings: patch-level table for the extreme-patches figure (paper Fig 3).
      records_dir: the records holding those patches.
      extreme_gene: gene of that figure ("" = no figure).
      extreme_dim: its dimension; -1 = the one varying most over the gene's patches.
      average_duplicate_genes: average the rows of a gene repeated in a gene-level table
        (with a warning) instead of stopping with an error naming them.
      attribution_model: a training run (or .keras) whose attribution maps are added to
        the extreme-patches figure ("" = none; `ish_tf.attribution`).
    """

    tasks: tuple[str, ...] = ("annotations",)
    embeddings: dict[str, str] = dataclasses.field(default_factory=dict)
    out_dir: str = "runs/evaluate"
    splits: tuple[str, ...] = ()
    zeng_table: str = ""
    gaf: str = ""
    obo: str = ""
    go_aspects: tuple[str, ...] = ("P", "F", "C")
    go_exclude_evidence: tuple[str, ...] = ()
    annotation_tables: tuple[str, ...] = ()
    annotation_columns: tuple[str, ...] = ()
    donor_matrix: str = ""
    manifest: str = ""
    donor_control: bool = True
    join_key: str = "auto"
    common_genes: bool = True
    scoring: ScoringConfig = dataclasses.field(default_factory=ScoringConfig)
    diagnosis: DiagnosisConfig = dataclasses.field(default_factory=DiagnosisConfig)
    top_genes: int = 20
    reid_level: str = "image"
    reid_metric: str = "euclidean"
    report: bool = True
    map_method: str = "pca"
    patch_embeddings: str = ""
    records_dir: str = ""
    extreme_gene: str = ""
    extreme_dim: int = -1
    average_duplicate_genes: bool = False
    attribution_model: str = ""

    def validate(self) -> EvaluateConfig:
        """Checks that each task has its inputs.

        Raises:
          ValueError: an unknown task, or a task without its inputs (names the flag).
        """
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"--task must be a comma list of {', '.join(TASKS)}; got "
                             f"{','.join(self.tasks) or 'nothing'}")
        if "annotations" in self.tasks:
            if not (self.zeng_table or self.gaf or self.annotation_tables):
                raise ValueError("--task=annotations needs --zeng_table, --gaf or --annotations")
            if not (self.embeddings or self.donor_matrix or (self.manifest and self.donor_control)):
                raise ValueError("--task=annotations needs --embedding/--embeddings "
                                 "(or --donor_matrix/--manifest)")
        if "diagnosis" in self.tasks and not (self.embeddings and self.manifest):
            raise ValueError("--task=diagnosis needs --embedding/--embeddings and --manifest")
        if "reid" in self.tasks and not self.embeddings:
            raise ValueError("--task=reid needs --embedding/--embeddings")
        if self.obo and not self.gaf:
            raise ValueError("--obo needs --gaf")
        if self.extreme_gene and not (self.patch_embeddings and self.records_dir):
            raise ValueError("--extreme_gene needs --patch_embeddings and --records_dir")
        if "all" in self.splits and len(self.splits) > 1:
            raise ValueError(f"--splits=all cannot be combined with other splits, got "
                             f"{','.join(self.splits)}")
        if hasattr(self.scoring, "validate"):
            self.scoring.validate()
        return self

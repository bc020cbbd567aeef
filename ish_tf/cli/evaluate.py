"""`bin/evaluate`: score embeddings on annotations, GO, diagnosis and re-identification.

Examples:
  bin/evaluate --task=annotations --zeng_table=zeng2012_table_s2.xlsx \
      --embeddings=triplet=triplet.csv,resnet50=resnet50.csv,random=random.csv \
      --donor_matrix=gene_donor_matrix.csv --out=runs/eval
  bin/evaluate --task=annotations,reid --embedding=embed/images.csv \
      --annotations=data/synth/annotations.csv --gaf=data/synth/go.gaf --manifest=... --out=...
  bin/evaluate --flagfile=configs/evaluate_cortex.cfg

Writes, under --out, for the tasks that ran:
  annotations.csv (annotation, category, n_genes, auc, auc_pr, f1, max_p, embedding, ...),
  annotations_summary.csv (mean AUC per embedding and category), annotations_wide.csv
  (a column per embedding), comparisons.csv (paired tests; 2+ embeddings),
  annotations_skipped.csv, gene_matches.csv;
  diagnosis.csv (per gene), diagnosis_top.csv, diagnosis_summary.csv, diagnosis_skipped.csv;
  reid.csv; figures/*.png and report.html (--report); evaluate_flags.cfg (replayable).
"""

from __future__ import annotations

import os
import sys
import time

from absl import app, logging

from ish_tf import flags
from ish_tf.evaluate.run import run, write_figures_and_report

flags.define_common()
flags.define_evaluate()
FLAGS = flags.FLAGS

def _print_summary(done: dict, seconds: float) -> None:
    print(f"evaluate: finished {', '.join(done)} in {seconds:.1f}s")
    if "annotations" in done:
        s = done["annotations"]["summary"]
        overall = s[s["category"] == "all"]
        for _, row in overall.iterrows():
            print(f"  annotations: {row['embedding']}: mean AUC {row['mean_auc']:.3f} over "
                  f"{int(row['n_groups'])} groups")
    if "diagnosis" in done:
        s = done["diagnosis"]["summary"]
        for _, row in s[s["features"] == "embedding"].iterrows():
            print(f"  diagnosis: {row['embedding']}: mean AUC {row['mean_auc']:.3f} over "
                  f"{int(row['n_genes'])} genes")
    if "reid" in done:
        r = done["reid"]["reid"]
        for _, row in r[r["candidates"] == "other_donor"].iterrows():
            print(f"  reid: {row['embedding']}: rank-1 (other donors) {row['rank1']:.3f}, "
                  f"chance {row['chance']:.3f}")
    for task in done.values():
        for name, path in task["written"].items():
            print(f"  {name + ':':22s}{os.path.abspath(path)}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        config = flags.evaluate_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    start = time.monotonic()
    try:
        done = run(config)
    except (ValueError, KeyError, OSError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 1
    flags.write_flagfile(os.path.join(config.out_dir, "evaluate_flags.cfg"))
    status, report_path = 0, ""
    if config.report:
        try:
            report_path = write_figures_and_report(config, done)
        except Exception as e:  # noqa: BLE001 - the CSVs are written; say why the report is not
            logging.exception("report failed")
            print(f"evaluate: error: figures/report failed ({type(e).__name__}: {e}); "
                  f"the CSVs are written", file=sys.stderr)
            status = 1
    _print_summary(done, time.monotonic() - start)
    if report_path:
        print(f"  {'report:':22s}{os.path.abspath(report_path)}")
    return status


if __name__ == "__main__":
    app.run(main)

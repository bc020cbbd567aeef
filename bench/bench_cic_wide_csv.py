"""A wide CSV of raw counts through `bin/ingest --expression`: what a user with a
whole-transcriptome table (tens of thousands of genes) sees.

  python bench/bench_cic_wide_csv.py [--cells=300] [--genes=30000] [--workdir=/tmp/wide]

Writes a samples x genes CSV of synthetic negative-binomial counts (with a cell_type
column) and ingests it with the defaults (counts detected, log1p-normalised, the 1,000
highest-variance genes of the training split standardised), printing the command's own
summary, the wall time, the CSV size and the peak memory of this process.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cells", type=int, default=300)
    p.add_argument("--genes", type=int, default=30000)
    p.add_argument("--workdir", default="/tmp/ish_tf_wide_csv")
    a = p.parse_args()

    import pandas as pd

    from ish_tf import cli
    from ish_tf.data.synthetic_expression import ExpressionSynthConfig, synthetic_profiles

    shutil.rmtree(a.workdir, ignore_errors=True)
    os.makedirs(a.workdir)
    t0 = time.monotonic()
    counts, obs, genes = synthetic_profiles(ExpressionSynthConfig(
        n_cells=a.cells, n_genes=a.genes, n_types=6, genes_per_program=200, mean_count=0.3))
    table = pd.DataFrame(counts, index=obs.index, columns=genes)
    table.insert(0, "cell_type", obs["cell_type"])
    path = os.path.join(a.workdir, "counts.csv")
    table.to_csv(path)
    zeros = float((counts == 0).mean())
    print(f"wrote {path}: {a.cells} samples x {a.genes} genes + cell_type, "
          f"{os.path.getsize(path) / 1e6:.1f} MB, {zeros:.0%} zeros "
          f"({time.monotonic() - t0:.1f} s)")
    t0 = time.monotonic()
    rc = cli.invoke("ingest", [f"--expression={path}", "--label_column=cell_type",
                               f"--out={os.path.join(a.workdir, 'ingested')}"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"bin/ingest exit {rc} in {time.monotonic() - t0:.1f} s; peak memory of this "
          f"process {peak:.0f} MB")


if __name__ == "__main__":
    main()

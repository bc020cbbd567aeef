"""`bin/cic`: after a cell-identity-code run, what each code unit means.

Example:
  bin/cic interpret --run_dir=runs/cic --profiles=data/pbmc --out=runs/cic/interpret
  bin/cic interpret --run_dir=runs/cic --profiles=data/profiles_records \\
      --gmt=data/profiles/programs.gmt --out=runs/cic/interpret

`interpret` sets each code unit of the mean training code to mean + 2 SD, decodes it and
ranks the genes by change (`ish_tf.families.cic.interpret`): OUT/unit_genes.csv,
OUT/units/unit_NN.csv (top --top_genes per unit); with --gmt a hypergeometric enrichment
of each unit's list (Bonferroni), OUT/enrichment.csv; OUT/interpret_summary.json.
"""

from __future__ import annotations

import sys

from ish_tf.cli import define_common, definer, run

NAME = "cic"
ACCEPTS_ARGS = True  # the tool: interpret
COMMANDS = ("interpret",)


def define_cic_tools(fv) -> None:
    """Flags of `bin/cic interpret`."""
    d = definer(fv, NAME)
    d.string("run_dir", "", "A cic or cic_classifier training run (its model.keras), or a "
             ".keras file.")
    d.string("profiles", "", "The bin/ingest --expression directory it was trained on.")
    d.string("out", "", "Output directory; empty = RUN/interpret.")
    d.integer("top_genes", 100, "Genes ranked and kept per code unit.", lower_bound=1)
    d.float("perturb_sd", 2.0, "The perturbation of a unit, in standard deviations of its "
            "training codes.", lower_bound=0.0)
    d.string("gmt", "", "Gene sets (GMT: name, description, genes; tab-separated) for a "
             "hypergeometric enrichment of each unit's top genes; empty = none.")
    d.integer("min_set_size", 3, "Gene sets with fewer of the model's genes are not tested.",
              lower_bound=1)
    d.float("alpha", 0.05, "Bonferroni-corrected level reported as significant.",
            lower_bound=0.0, upper_bound=1.0)


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_cic_tools(fv)


def main(fv, argv: list[str]) -> int:
    """Runs one tool; returns the exit status (0 ok, 1 the run cannot be interpreted)."""
    import os

    from absl import app

    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError("give one command, interpret: bin/cic interpret --run_dir=RUN "
                             "--profiles=DIR")
    if not fv.run_dir or not fv.profiles:
        raise app.UsageError("--run_dir and --profiles are required")
    from ish_tf.data.expression import ExpressionError
    from ish_tf.families.cic.interpret import InterpretError, interpret_run

    out = fv.out or os.path.join(fv.run_dir, "interpret")
    try:
        s = interpret_run(fv.run_dir, fv.profiles, out, top=fv.top_genes, sd=fv.perturb_sd,
                          gmt=fv.gmt, min_set_size=fv.min_set_size, alpha=fv.alpha)
    except (InterpretError, ExpressionError, OSError) as e:
        print(f"cic: error: {e}", file=sys.stderr)
        return 1
    print(f"cic interpret: {s['units']} units x top {s['top_genes']} genes (+{s['perturbation_sd']:g} "
          f"SD) -> {s['unit_genes']}")
    if "gmt" in s:
        print(f"  enrichment: {s['units_with_a_significant_set']} of {s['units']} units with a "
              f"set at Bonferroni p < {s['alpha_bonferroni']} ({s['gene_sets_tested']} sets "
              f"tested per unit); sets found: {', '.join(s['sets_found']) or 'none'}")
        b = s["pca_baseline"]
        print(f"  baseline:   PCA at the same width: {b['units_with_a_significant_set']} of "
              f"{b['units']} components; sets found: {', '.join(b['sets_found']) or 'none'}")
        print(f"  table:      {s['enrichment']}")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main, accepts_args=ACCEPTS_ARGS)

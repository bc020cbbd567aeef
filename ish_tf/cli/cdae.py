"""`bin/cdae`: after a CDAE run, its baselines; after a supervised one, its per-term AUC.

Example:
  bin/cdae baselines --run_dir=runs/cdae_quickstart
  bin/cdae term_auc --run_dir=runs/cdae_mouse_go --split=test

`baselines` writes RUN/baselines/: pixel PCA to the code size and the untrained encoder
as image- and gene-level embedding tables (for `bin/evaluate --embeddings=...`), and
code_reliance.json (how much the decoder takes from the code rather than the switches).
`term_auc` writes RUN/term_auc_{split}.csv: the supervised model's AUC per term on the
held-out genes, next to the CDAE codes + logistic regression on the same genes.
"""

from __future__ import annotations

import sys

from ish_tf.cli import define_common, definer, run

NAME = "cdae"
ACCEPTS_ARGS = True  # the tool: baselines or term_auc
COMMANDS = ("baselines", "term_auc")


def define_cdae_tools(fv) -> None:
    """Flags of `bin/cdae baselines|term_auc` (after a CDAE or cdae_supervised run)."""
    d = definer(fv, NAME)
    d.string("run_dir", "", "A cdae (baselines) or cdae_supervised (term_auc) training run.")
    d.string("records_dir", "", "Whole-section records; empty = the run's.")
    d.string("split", "test", "term_auc: the held-out split to score.")
    d.string("codes_run", "", "term_auc: a CDAE run (or .keras file) whose codes + logistic "
             "regression (fit on the other splits' genes) are scored on the same genes; "
             "empty = the supervised run's --cdae_init_from.")
    d.string("out", "", "Output directory; empty = RUN (term_auc) or RUN/baselines.")


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_cdae_tools(fv)


def main(fv, argv: list[str]) -> int:
    """Runs one tool; returns the exit status (0 ok, 1 the run cannot be scored)."""
    from absl import app

    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' or '.join(COMMANDS)}: "
                             "bin/cdae baselines|term_auc --run_dir=RUN")
    if not fv.run_dir:
        raise app.UsageError("--run_dir is required")
    from ish_tf.families.cdae import baselines as cdae_baselines

    try:
        if argv[1] == "term_auc":
            _, path, line = cdae_baselines.write_term_auc(fv.run_dir, fv.records_dir, fv.split,
                                                          fv.codes_run, fv.out)
            print(f"{line} -> {path}")
        else:
            for line in cdae_baselines.write_baselines(fv.run_dir, fv.records_dir, fv.out):
                print(line)
    except cdae_baselines.CdaeRunError as e:
        print(f"cdae: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main, accepts_args=ACCEPTS_ARGS)

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

from absl import app

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_cdae_tools()
FLAGS = flags.FLAGS
COMMANDS = ("baselines", "term_auc")


def main(argv: list[str]) -> int:
    """Runs one command; returns the exit status (0 ok, 1 the run cannot be scored)."""
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' or '.join(COMMANDS)}: "
                             "bin/cdae baselines|term_auc --run_dir=RUN")
    if not FLAGS.run_dir:
        raise app.UsageError("--run_dir is required")
    from ish_tf.families.cdae import baselines as cdae_baselines

    try:
        if argv[1] == "term_auc":
            _, path, line = cdae_baselines.write_term_auc(FLAGS.run_dir, FLAGS.records_dir,
                                                     FLAGS.split, FLAGS.codes_run, FLAGS.out)
            print(f"{line} -> {path}")
        else:
            for line in cdae_baselines.write_baselines(FLAGS.run_dir, FLAGS.records_dir, FLAGS.out):
                print(line)
    except cdae_baselines.CdaeRunError as e:
        print(f"cdae: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)

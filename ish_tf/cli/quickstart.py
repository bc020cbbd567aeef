"""`bin/quickstart`: the whole gene re-identification pipeline on a synthetic dataset.

  bin/quickstart                         # uses configs/quickstart.cfg, writes work/quickstart/
  bin/quickstart --workdir=/tmp/qs       # elsewhere
  bin/quickstart --steps=600             # any stage flag can be overridden

configs/quickstart.cfg includes the stage flagfiles (synth, extract, triplet training)
and sets the quickstart's sizes; paths are taken from --workdir. Rerunning resumes.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, logging

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_synth()
flags.define_extract()
flags.define_model()
flags.define_train()
flags.define_quickstart()
FLAGS = flags.FLAGS



def main(argv: list[str]) -> int:
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.quickstart import QuickstartConfig, run_quickstart

    try:
        cfg = QuickstartConfig(
            workdir=FLAGS.workdir, synth=flags.synth_config(FLAGS),
            extract=flags.extract_config(FLAGS), model=flags.model_config(FLAGS),
            train=flags.train_config(FLAGS), embed_batch_size=FLAGS.embed_batch_size_qs,
            seed=FLAGS.seed)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(FLAGS.workdir, exist_ok=True)
    flags.write_flagfile(os.path.join(FLAGS.workdir, "quickstart_flags.cfg"))
    logging.set_verbosity(logging.WARNING)
    print(f"ish_tf quickstart: writing to {os.path.abspath(FLAGS.workdir)}")
    print(f"  watch training with: tensorboard --logdir {os.path.join(FLAGS.workdir, 'run', 'logs')}")
    try:
        summary = run_quickstart(cfg, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print("quickstart: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    r = summary["rank1"]
    print()
    print(f"Other-donor rank-1 on {summary['n_queries']} images of held-out "
          f"({summary['eval_split']}) genes: trained {r['trained']:.3f}, untrained "
          f"{r['untrained']:.3f}, random {r['random']:.3f}, chance {summary['chance']:.3f}")
    print(f"SavedModel: {summary['saved_model']}")
    if summary["paths"]["report"]:
        print(f"Report:     {summary['paths']['report']}")
    print(f"Summary:    {os.path.join(os.path.abspath(FLAGS.workdir), 'summary.json')}")
    print(f"Total:      {sum(summary['seconds'].values()):.0f} s "
          f"({json.dumps(summary['seconds'])})")
    return 0


if __name__ == "__main__":
    app.run(main)

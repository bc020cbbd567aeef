"""`bin/quickstart`: a family's pipeline end to end on built-in synthetic data.

  bin/quickstart                         # gene re-identification (triplet), configs/quickstart.cfg
  bin/quickstart --workdir=/tmp/qs       # elsewhere
  bin/quickstart --steps=600             # any stage flag can be overridden
  bin/quickstart --family=cdae           # the CDAE recipe -> work/quickstart/cdae/summary.json
  bin/quickstart --family=ish_cnn        # the ISH CNN recipe -> work/quickstart/ish_cnn/summary.json
  bin/quickstart --family=cic            # cell identity codes -> work/quickstart/cic/summary.json
  bin/quickstart --family=cic --expression=cells.h5ad --label_column=cell_type [--use_raw]
  bin/quickstart --family=mean_teacher   # the fluorescence (RxRx1) recipe -> work/quickstart/mean_teacher/summary.json

configs/quickstart.cfg includes the stage flagfiles (synth, extract, triplet training)
and sets the quickstart's sizes; paths are taken from --workdir. The other families run
the commands of their README recipe (`ish_tf.families.<name>.quickstart`) below
--workdir/<name>. Rerunning resumes.
"""

from __future__ import annotations

import json
import os
import sys

from ish_tf import config
from ish_tf.cli import define_common, definer, log_file, run, usage_errors
from ish_tf.cli.extract import define_extract, extract_config
from ish_tf.cli.synth import define_synth, synth_config
from ish_tf.cli.train import define_model, define_train, model_config, train_config

NAME = "quickstart"


def define_quickstart(fv) -> None:
    """Flags of `bin/quickstart` (besides the synth, extract, model and train sections)."""
    from ish_tf.families import family_names, get_family

    d = definer(fv, NAME)
    d.string("workdir", "work/quickstart", "Directory for every stage's output.")
    d.enum("family", "triplet", [n for n in family_names() if get_family(n).quickstart],
           "Family whose quickstart runs: triplet (the default, gene re-identification) or "
           "another family's README recipe, written to --workdir/<family>.")
    d.string("expression", "", "--family=cic: an expression matrix (.h5ad, CSV) to run on "
             "instead of synthetic profiles.")
    d.string("label_column", "", "--family=cic --expression: the column of cell-type labels.")
    d.bool("use_raw", False, "--family=cic --expression: read the .h5ad's .raw matrix.")
    d.integer("embed_batch_size_qs", 128, "Patches per call of the served model when the "
              "quickstart embeds.")


def define_flags(fv) -> None:
    """The quickstart's own flags, then synth's, extract's and train's (stage paths are
    replaced by ones under --workdir)."""
    define_common(fv)
    define_quickstart(fv)
    define_synth(fv)
    define_extract(fv)
    define_model(fv)
    define_train(fv)


def quickstart_config(fv):
    """`ish_tf.families.triplet.quickstart.QuickstartConfig` from the stage flags.

    Raises:
      ValueError: a stage rejects its flags.
    """
    from ish_tf.families.triplet.quickstart import QuickstartConfig

    return QuickstartConfig(
        workdir=fv.workdir, synth=synth_config(fv), extract=extract_config(fv),
        model=model_config(fv), train=train_config(fv), embed_batch_size=fv.embed_batch_size_qs,
        seed=fv.seed)


def main(fv, argv: list[str]) -> int:
    """Runs the whole pipeline; returns the exit status (0 ok, 130 Ctrl-C)."""
    from ish_tf.families.triplet.quickstart import run_quickstart

    if fv.family != "triplet":
        return _family_quickstart(fv)
    with usage_errors():
        cfg = quickstart_config(fv)
    try:
        os.makedirs(fv.workdir, exist_ok=True)
        config.write_flagfile(os.path.join(fv.workdir, "quickstart_flags.cfg"), fv)
        print(f"ish_tf quickstart: writing to {os.path.abspath(fv.workdir)}")
        # bin/train's tensorboard line is printed once, by the trainer, when training starts.
        with log_file(os.path.join(fv.workdir, "quickstart.log")):
            summary = run_quickstart(cfg, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print("quickstart: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (OSError, ValueError, RuntimeError) as e:
        # Each stage's errors name their file; a disk error gets its path here.
        print(f"quickstart: error: {_describe(e)}; finished stages are kept: rerun the same "
              "command to resume", file=sys.stderr)
        return 1
    r = summary["rank1"]
    print()
    print(f"Other-donor rank-1 on {summary['n_queries']} images of held-out "
          f"({summary['eval_split']}) genes: trained {r['trained']:.3f}, untrained "
          f"{r['untrained']:.3f}, random {r['random']:.3f}, chance {summary['chance']:.3f}")
    print(f"SavedModel: {summary['saved_model']}")
    if summary["paths"]["report"]:
        print(f"Report:     {summary['paths']['report']}")
    print(f"Summary:    {os.path.join(os.path.abspath(fv.workdir), 'summary.json')}")
    print(f"Total:      {sum(summary['seconds'].values()):.0f} s "
          f"({json.dumps(summary['seconds'])})")
    return 0


def _describe(error: BaseException) -> str:
    """One line for a stage's error: an OSError as `PATH: cannot write (reason)`."""
    if isinstance(error, OSError) and error.filename:
        return f"{error.filename}: cannot write ({error.strerror or error})"
    return str(error)


def _family_quickstart(fv) -> int:
    """Runs another family's recipe below --workdir/<family>."""
    from ish_tf.families import get_family, resolve_ref
    from ish_tf.families.recipes import RecipeError

    workdir = os.path.join(fv.workdir, fv.family)
    kwargs = {}
    if fv.expression or fv.label_column or fv.use_raw:
        if fv.family != "cic":
            print("quickstart: error: --expression/--label_column/--use_raw are for "
                  "--family=cic", file=sys.stderr)
            return 2
        if fv.expression and not fv.label_column:
            print("quickstart: error: --expression needs --label_column", file=sys.stderr)
            return 2
        kwargs = {"expression": fv.expression, "label_column": fv.label_column,
                  "use_raw": fv.use_raw}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(f"ish_tf quickstart ({fv.family}): writing to {os.path.abspath(workdir)}")
    try:
        summary = resolve_ref(get_family(fv.family).quickstart)(
            workdir, root=root, seed=fv.seed, log=lambda s: print(s, flush=True), **kwargs)
    except KeyboardInterrupt:
        print("quickstart: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (RecipeError, OSError) as e:
        print(f"quickstart: error: {_describe(e)}", file=sys.stderr)
        return 1
    print(f"Summary:    {summary['path']}")
    print(f"Total:      {sum(summary['seconds'].values()):.0f} s "
          f"({json.dumps(summary['seconds'])})")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)

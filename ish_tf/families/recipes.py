"""Running a family's README recipe as commands, for `bin/quickstart --family=NAME`.

A recipe is the list of `bin/` command lines a user would type (the README's), with
paths below one work directory. Each runs in this process through the commands' own
entry points (`ish_tf.cli.invoke`), so the quickstart exercises exactly what the README
promises; a non-zero exit stops the recipe, naming the command.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Callable, Sequence

from ish_tf.io_utils import atomic_write_text

SUMMARY_NAME = "summary.json"


class RecipeError(RuntimeError):
    """A command of a recipe failed; the message names it and its exit code."""


def run_commands(commands: Sequence[tuple[str, str, list[str]]], log: Callable[[str], None]
                 ) -> dict[str, float]:
    """Runs (stage name, command, argv) in order; returns {stage: seconds}.

    Raises:
      RecipeError: a command exited non-zero.
    """
    from ish_tf.cli import invoke

    times: dict[str, float] = {}
    for stage, command, argv in commands:
        log(f"[quickstart] {stage}: bin/{command} {' '.join(shlex.quote(a) for a in argv)}")
        t0 = time.monotonic()
        rc = invoke(command, argv)
        times[stage] = round(time.monotonic() - t0, 1)
        if rc != 0:
            raise RecipeError(f"bin/{command} exited with {rc} at stage '{stage}'; rerun the "
                              "quickstart to resume from there")
        log(f"[quickstart] {stage} done in {times[stage]:.1f} s")
    return times


def write_summary(workdir: str, summary: dict) -> str:
    """WORKDIR/summary.json (atomically); returns its path."""
    path = os.path.join(workdir, SUMMARY_NAME)
    atomic_write_text(path, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return path

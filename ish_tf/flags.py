"""Every absl flag of ish_tf, defined once, and their conversion into config objects.

Only this module and `ish_tf/cli/*` touch `absl.flags.FLAGS`. Each `bin/` command
calls the `define_*` functions for the stages it uses, then the matching
`*_config(FLAGS)` converter, and hands the resulting dataclass to library code.
Library modules never read FLAGS.

Every command accepts `--flagfile=configs/NAME.cfg` (absl built-in). A run directory
keeps its resolved flags as a flagfile (`write_flagfile`), so any run can be replayed.

Sections are grouped by stage; each stage's converter imports its config class
lazily so `bin/fetch` does not pay for importing TensorFlow.
"""

from __future__ import annotations

import os

from absl import flags

from ish_tf.io_utils import atomic_write_text

FLAGS = flags.FLAGS

_defined: set[str] = set()


def _once(group: str) -> bool:
    """True the first time a group is defined (groups may be requested by several commands)."""
    if group in _defined:
        return False
    _defined.add(group)
    return True


# --------------------------------------------------------------------------- common
def define_common() -> None:
    if not _once("common"):
        return
    flags.DEFINE_integer("seed", 0, "Seed for every random choice of the stage.")
    flags.DEFINE_bool("small_run", False,
                      "Shrink batch sizes, buffers and step counts for a local smoke run.")


def write_flagfile(path: str, module_names: list[str] | None = None) -> None:
    """Writes the current values of ish_tf's flags to `path` as a replayable flagfile.

    Args:
      path: destination; written atomically.
      module_names: modules whose flags to include (default: this module, i.e. all
        ish_tf flags). Flags from absl itself (logging, flagfile) are left out.
    """
    modules = module_names or [__name__]
    lines = [f"# Resolved flags, replay with: --flagfile={os.path.basename(path)}"]
    for module in modules:
        for flag in FLAGS.get_flags_for_module(module):
            lines.append(flag.serialize())
    atomic_write_text(path, "\n".join(line for line in lines if line) + "\n")


def parse_list(value: str | list[str] | None) -> list[str]:
    """Comma-separated flag text (or an absl list) to a clean list of strings."""
    if value is None:
        return []
    items = value if isinstance(value, list) else value.split(",")
    return [s.strip() for s in items if s and s.strip()]

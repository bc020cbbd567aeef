"""`bin/export`: a training run's model.keras -> a versioned TF Serving SavedModel.

Examples:
  bin/export --model_dir=runs/triplet --export_dir=export/triplet
  bin/export --model_dir=runs/triplet --export_dir=export/triplet --version=7 --keep=3

Writes EXPORT/<name>/<version>/ (saved_model.pb, variables/, assets.extra/ish_tf.json
with family, input size, outputs, the run's flags and the record schema, and
assets.extra/flags.cfg). `serving_default` takes JPEG/PNG bytes (`image_bytes`,
tf.string (B,)) and returns the family's outputs, e.g. `embedding` (B, D).
Versions are integers (default newest + 1, so TF Serving picks the new one up);
only the newest --keep versions are kept.
"""

from __future__ import annotations

import sys

from ish_tf.cli import define_common, definer, run, usage_errors

NAME = "export"


def define_export(fv) -> None:
    """Flags of `bin/export` (RUN/model.keras -> versioned SavedModel EXPORT/<name>/<v>/)."""
    d = definer(fv, NAME)
    d.string("model_dir", "", "Training run directory RUN (holding model.keras, "
             "model_config.json, flags.cfg), or a .keras file.")
    d.string("export_dir", "", "Export base EXPORT/<name>: versions are written to integer "
             "subdirectories (TF Serving's model base path).")
    d.string("family", "", "Model family (sets the output names); empty = the builder in "
             "RUN/model_config.json, else triplet.")
    d.integer("version", 0, "Version number to write; 0 = newest + 1.", lower_bound=0)
    d.integer("keep", 5, "Keep only the newest N versions after exporting; 0 = all.",
              lower_bound=0)
    d.bool("overwrite", False, "Replace --version if it already exists.")


def export_config(fv):
    """`ish_tf.export.saved_model.ExportConfig` from the export flags.

    Raises:
      ish_tf.export.ExportError (a ValueError): a required flag is empty.
    """
    from ish_tf.export.saved_model import ExportConfig

    return ExportConfig(model_dir=fv.model_dir, export_dir=fv.export_dir, family=fv.family,
                        version=fv.version or None, keep=fv.keep,
                        overwrite=fv.overwrite).validate()


def define_flags(fv) -> None:
    define_common(fv)
    define_export(fv)


def main(fv, argv: list[str]) -> int:
    """Exports; returns the exit status (0 ok, 1 export error)."""
    from ish_tf.export.saved_model import ExportError, export_run, list_versions, read_metadata

    with usage_errors():
        cfg = export_config(fv)
    try:
        path = export_run(cfg.model_dir, cfg.export_dir, family=cfg.family or None,
                          version=cfg.version, keep=cfg.keep, overwrite=cfg.overwrite)
    except (ExportError, OSError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    meta = read_metadata(path)
    shape = meta["input"]
    print(f"export: {meta['family']} model -> {path}")
    print(f"  serving_default: image_bytes (JPEG/PNG strings) -> {', '.join(meta['outputs'])}; "
          f"input {shape['height']}x{shape['width']}x{shape['channels']}")
    print(f"  versions kept in {cfg.export_dir}: {list_versions(cfg.export_dir)}")
    print(f"  inspect: saved_model_cli show --dir {path} --tag_set serve "
          "--signature_def serving_default")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)

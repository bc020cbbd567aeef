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

from absl import app

from ish_tf import flags
from ish_tf.cli import quiet_tensorflow_info

flags.define_common()
flags.define_export()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    quiet_tensorflow_info()  # before any library import brings TensorFlow in
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.export.saved_model import ExportError, export_run, list_versions, read_metadata

    try:
        cfg = flags.export_config(FLAGS)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
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
    app.run(main)

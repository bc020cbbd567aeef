"""`bin/export`: a training run's model.keras -> a versioned TF Serving SavedModel.

Examples:
  bin/export --model_dir=runs/triplet --export_dir=export/triplet
  bin/export --model_dir=runs/triplet --export_dir=export/triplet --version=7 --keep=3
  bin/export --model_dir=runs/triplet --export_dir=export/triplet_search \\
      --search_index=work/embed/gene_embeddings.csv

Writes EXPORT/<name>/<version>/ (saved_model.pb, variables/, assets.extra/ish_tf.json
with family, input size, outputs, the run's flags and the record schema, and
assets.extra/flags.cfg). `serving_default` takes what the input kind allows (JPEG/PNG
bytes `image_bytes` for 1- or 3-channel uint8 images, raw `images` or `vectors`
otherwise), `tf_example` takes serialized records; both return the family's outputs,
e.g. `embedding` (B, D); the summary printed lists the signatures from the sidecar.
Versions are integers (default newest + 1, so TF Serving picks the new one up);
only the newest --keep of ish_tf's own SavedModels are kept: a numeric folder that is
not one is never deleted (and is an error when it is the --version to write).
--search_index adds the `search` and `search_embedding` signatures: the top-k genes of
the stored table nearest to a query (ish_tf.export.search; bin/search queries them).
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
    d.integer("keep", 5, "Keep only the newest N ish_tf SavedModel versions after "
              "exporting; 0 = all. Numeric folders that are not ish_tf SavedModels are never "
              "counted or deleted.", lower_bound=0)
    d.bool("overwrite", False, "Replace --version if it already exists.")
    d.string("search_index", "", "Embedding table (e.g. bin/embed's gene_embeddings.csv) "
             "stored in the export for the `search` signatures: the top-k genes of a query "
             "image (see ish_tf.export.search); empty = no search.")
    d.enum("search_metric", "", ["", "euclidean", "sqeuclidean", "cityblock", "cosine"],
           "Distance of the search; empty = the model's training metric "
           "(RUN/model_config.json), else euclidean.")
    d.enum("serving_resize", "near", ["near", "any"], "JPEG/PNG images sent to "
           "serving_default: near = resized to the model's input size when within 2x of it, "
           "others rejected with an error naming both sizes; any = resize every image (a "
           "whole section is squashed to one input).")


def export_config(fv):
    """`ish_tf.export.saved_model.ExportConfig` from the export flags.

    Raises:
      ish_tf.export.ExportError (a ValueError): a required flag is empty.
    """
    from ish_tf.export.saved_model import ExportConfig

    return ExportConfig(model_dir=fv.model_dir, export_dir=fv.export_dir, family=fv.family,
                        version=fv.version or None, keep=fv.keep,
                        overwrite=fv.overwrite, serving_resize=fv.serving_resize).validate()


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_export(fv)


def main(fv, argv: list[str]) -> int:
    """Exports; returns the exit status (0 ok, 1 export error)."""
    from ish_tf.export.saved_model import (
        SERVING_DEFAULT,
        ExportError,
        export_run,
        exported_versions,
        read_metadata,
    )

    with usage_errors():
        cfg = export_config(fv)
    try:
        path = export_run(cfg.model_dir, cfg.export_dir, family=cfg.family or None,
                          version=cfg.version, keep=cfg.keep, overwrite=cfg.overwrite,
                          search_index=fv.search_index or None,
                          search_metric=fv.search_metric,
                          serving_resize=cfg.serving_resize)
        meta = read_metadata(path)
        kept = exported_versions(cfg.export_dir)
    except (ExportError, OSError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(f"export: {meta['family']} model -> {path}")
    names = meta.get("signature_names") or {}
    signatures = meta.get("signatures") or {}
    default = names.get("serving_default", SERVING_DEFAULT)
    for role in ("serving_default", "decoded", "records"):
        sig = names.get(role, default if role == "serving_default" else None)
        if not sig or sig not in signatures:
            continue
        inputs = "; ".join(f"{k} {v}" for k, v in signatures[sig].get("inputs", {}).items())
        print(f"  {sig}: {inputs} -> {', '.join(meta['outputs'])}")
    if meta.get("search"):
        from ish_tf.export.search import describe_search

        print(describe_search(meta))
    print(f"  input kind: {meta.get('input_kind', 'image')}"
          f"{_describe_input(meta.get('input') or {})}")
    print(f"  versions kept in {cfg.export_dir}: {kept}")
    print(f"  inspect: saved_model_cli show --dir {path} --tag_set serve "
          f"--signature_def {default}")
    return 0


def _describe_input(shape: dict) -> str:
    if shape.get("dim") is not None:
        return f", {shape['dim']} values"
    if shape.get("height") is not None:
        return f", {shape['height']}x{shape['width']}x{shape['channels']}"
    return ""


if __name__ == "__main__":
    run(NAME, define_flags, main)

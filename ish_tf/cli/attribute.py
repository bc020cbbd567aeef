"""`bin/attribute`: attribution maps of embedding dimensions for chosen patches.

Examples:
  bin/attribute --model_dir=runs/triplet --images=patch1.png,patch2.png --dims=3,17 \\
      --out=attr
  bin/attribute --model_dir=runs/triplet --records_dir=work/records --gene=SG001 \\
      --patches=12/0,12/4,40/7 --dims=5 --method=integrated_gradients --out=attr

For each dimension writes OUT/attribution_dim<k>.png (the patches, then each method's
map overlaid: integrated gradients on the pre-normalisation embedding with a
completeness check, Grad-CAM on the last convolutional block; see ish_tf.attribution)
and OUT/attribution_checks.csv (per patch and dimension: the attributions' sum, the
output change f(x) - f(x') and the completeness error). With --randomisation_check also
the Spearman rank correlation between each map and the map of the same architecture with
freshly initialised weights (low = the map depends on the trained weights).
"""

from __future__ import annotations

import os
import sys

from ish_tf import config
from ish_tf.cli import define_common, definer, run, usage_errors

NAME = "attribute"


def define_attribute(fv) -> None:
    """Flags of `bin/attribute`."""
    d = definer(fv, NAME)
    d.string("model_dir", "", "Training run RUN (holding model.keras) or a .keras file.")
    d.list("images", [], "Patch images (JPEG/PNG), comma-separated; resized to the model's "
           "input size like the export does.")
    d.string("records_dir", "", "TFRecord shards + index.json (bin/extract) to read "
             "--patches from.")
    d.string("gene", "", "Gene of --patches in --records_dir.")
    d.list("patches", [], "Patches in --records_dir as image_id/patch_index, comma-separated.")
    d.list("dims", ["0"], "Embedding dimensions to attribute.")
    d.list("method", ["integrated_gradients", "grad_cam"], "Methods: integrated_gradients, "
           "grad_cam.")
    d.enum("baseline", "white", ["white", "black", "blur"], "Integrated-gradients baseline: "
           "white (a blank slide), black, or a blurred copy of the patch.")
    d.integer("steps", 64, "Integrated-gradients path intervals.", lower_bound=2)
    d.bool("randomisation_check", True, "Also compare each map with the map of a randomly "
           "re-initialised copy of the model (rank correlation).")
    d.string("out", "", "Output directory.")


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_attribute(fv)


def _load_images(fv, size: tuple[int, int]):
    """(pixels float32 (B, H, W, 3) at the model size, labels)."""
    import numpy as np
    import tensorflow as tf

    from ish_tf.export.signatures import fit_image

    encoded, labels = [], []
    for path in config.parse_list(fv.images):
        if not os.path.isfile(path):
            raise ValueError(f"--images: {path}: no such file")
        with open(path, "rb") as f:
            encoded.append(f.read())
        labels.append(os.path.basename(path))
    if fv.patches:
        from ish_tf.evaluate.figures import read_patches

        wanted = []
        for item in config.parse_list(fv.patches):
            image_id, sep, index = item.partition("/")
            if not sep or not image_id.strip().isdigit() or not index.strip().isdigit():
                raise ValueError(f"--patches item {item!r} must be image_id/patch_index")
            wanted.append((int(image_id), int(index)))
        found = read_patches(fv.records_dir, fv.gene, set(wanted))
        missing = [w for w in wanted if w not in found]
        if missing:
            raise ValueError(f"{fv.records_dir}: patch(es) "
                             f"{', '.join(f'{a}/{b}' for a, b in missing)} of gene {fv.gene} "
                             "not found in the records")
        encoded += [found[w] for w in wanted]
        labels += [f"{fv.gene} {a}/{b}" for a, b in wanted]
    images = []
    for data, label in zip(encoded, labels, strict=True):
        try:
            img = tf.cast(tf.io.decode_image(data, channels=3, expand_animations=False),
                          tf.float32)
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"{label}: not a JPEG/PNG image ({e.message.splitlines()[0]})") from e
        images.append(fit_image(img, size[0], size[1], 3).numpy())
    return np.stack(images).astype(np.float32), labels


def main(fv, argv: list[str]) -> int:
    """Renders the maps; returns the exit status (0 ok, 1 bad model or input)."""
    import numpy as np
    import pandas as pd

    from ish_tf import attribution as at
    from ish_tf.export.saved_model import ExportError
    from ish_tf.io_utils import atomic_path

    with usage_errors():
        if not fv.model_dir or not fv.out:
            raise ValueError("--model_dir and --out are required")
        if not fv.images and not fv.patches:
            raise ValueError("give --images and/or --patches (with --records_dir and --gene)")
        if fv.patches and not (fv.records_dir and fv.gene):
            raise ValueError("--patches needs --records_dir and --gene")
        dims = [int(d) for d in config.parse_list(fv.dims)]
        methods = config.parse_list(fv.method)
        bad = [m for m in methods if m not in at.METHODS]
        if bad or not methods:
            raise ValueError(f"--method must be a list of {', '.join(at.METHODS)}, got {bad}")
    try:
        model = at.load_model(fv.model_dir)
        amodel, removed = at.attribution_model(model)
        size = tuple(int(s) for s in model.inputs[0].shape[1:3])
        images, labels = _load_images(fv, size)
        random_model = (at.attribution_model(at.randomised_copy(model))[0]
                        if fv.randomisation_check else None)
        os.makedirs(fv.out, exist_ok=True)
        rows, written = [], []
        for dim in dims:
            heat_maps = []
            for method in methods:
                hm, check = at.maps(amodel, images, dim, method, fv.baseline, fv.steps)
                heat_maps.append(hm)
                rho = (at.rank_correlation(hm, at.maps(random_model, images, dim, method,
                                                       fv.baseline, fv.steps)[0])
                       if random_model is not None else [np.nan] * len(images))
                for i, label in enumerate(labels):
                    rows.append({"patch": label, "dim": dim, "method": method,
                                 "attribution_sum": check["sum"][i] if check else np.nan,
                                 "output_change": check["delta"][i] if check else np.nan,
                                 "completeness_error": (check["completeness_error"][i]
                                                        if check else np.nan),
                                 "rank_corr_randomised": rho[i]})
            path = os.path.join(fv.out, f"attribution_dim{dim}.png")
            at.plot_maps(images, heat_maps, labels, methods, path,
                         f"dimension {dim} ({'pre-normalisation' if removed else 'output'})")
            written.append(path)
    except (at.AttributionError, ExportError, ValueError, OSError) as e:
        print(f"attribute: error: {e}", file=sys.stderr)
        return 1
    table = pd.DataFrame(rows)
    checks = os.path.join(fv.out, "attribution_checks.csv")
    with atomic_path(checks) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")
    print(f"attribute: {len(labels)} patch(es) x {len(dims)} dimension(s) -> {fv.out}")
    if "integrated_gradients" in methods:
        ig = table[table["method"] == "integrated_gradients"]
        print(f"  integrated gradients ({fv.baseline} baseline, {fv.steps} steps): median "
              f"completeness error {ig['completeness_error'].median():.3g}")
    if fv.randomisation_check:
        for method, rho in table.groupby("method", sort=False)["rank_corr_randomised"].mean().items():
            print(f"  {method}: mean rank correlation with a randomised model {rho:.3f}")
    for path in written + [checks]:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main)

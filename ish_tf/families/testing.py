"""Tiny inputs for exercising a family end to end (the shared harness, smoke runs).

Each family names a `tiny` function in its registry entry: `tiny(workdir, seed) ->
(ModelConfig, dict of TrainConfig fields)` writing the smallest data its task reads
(records of its input kind, or image/mask pairs) below `workdir`. A new family gets the
harness test (build -> 2 steps -> resume -> export -> fresh-process reload -> embed) by
registering one.
"""

from __future__ import annotations

import os

import numpy as np

from ish_tf.data.inputs import InputSpec


def tiny_examples(spec: InputSpec, identities: int = 4, groups: int = 2, per_group: int = 3,
                  seed: int = 0, prefix: str = "G") -> list[dict]:
    """Examples for `ish_tf.data.record_sets.write_record_set`: each identity with its own
    smooth pattern plus noise, so a model can tell them apart in a few steps.

    Args:
      spec: image (height, width, channels, dtype) or vector (dim) spec.
      identities, groups, per_group: identities x groups x records per (identity, group).
      seed: random seed.
      prefix: identity names are prefix + number.
    """
    rng = np.random.default_rng(seed)
    out, image_id = [], 0
    for i in range(identities):
        base = rng.uniform(0.2, 0.8, size=spec.shape if spec.kind == "vector" else
                           (spec.height, spec.width, spec.channels))
        for g in range(groups):
            for _ in range(per_group):
                example = {"identity": f"{prefix}{i}", "group": f"D{g}", "image_id": image_id}
                noisy = np.clip(base + rng.normal(0, 0.05, size=base.shape), 0, 1)
                if spec.kind == "vector":
                    example["vector"] = noisy.astype(np.float32)
                else:
                    top = 65535 if spec.dtype == "uint16" else 255
                    example["image"] = np.round(noisy * top).astype(spec.dtype)
                out.append(example)
                image_id += 1
    return out


def tiny_records(out_dir: str, spec: InputSpec, seed: int = 0, **kwargs) -> str:
    """A train + test record set of `tiny_examples` (test: one more set of identities)."""
    from ish_tf.data.record_sets import write_record_set

    train = tiny_examples(spec, seed=seed, **kwargs)
    test = tiny_examples(spec, identities=2, seed=seed + 1, prefix="T")
    offset = len(train)
    for k, example in enumerate(test):
        example["image_id"] = offset + k
    write_record_set(out_dir, {"train": train, "test": test}, spec, seed=seed)
    return out_dir


def image_mask_pairs(out_dir: str, n: int = 4, size: int = 32, seed: int = 0) -> str:
    """n synthetic sections (a dark disc of tissue on a white slide) with true masks and a
    manifest listing them; returns the manifest path (masks in out_dir/masks)."""
    import pandas as pd
    from PIL import Image

    from ish_tf.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "masks"), exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    rows = []
    for i in range(n):
        cy, cx, r = rng.uniform(0.35, 0.65) * size, rng.uniform(0.35, 0.65) * size, size * 0.3
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.uint8)
        image = np.where(mask[..., None], rng.uniform(60, 140, (size, size, 3)), 235)
        Image.fromarray(image.astype(np.uint8)).save(os.path.join(out_dir, "images", f"{i}.png"))
        Image.fromarray(mask * 255).save(os.path.join(out_dir, "masks", f"{i}.png"))
        rows.append({"image_id": i, "experiment_id": i, "study": "tiny", "gene_symbol": f"G{i}",
                     "donor_id": "D0", "width": size, "height": size,
                     "path": os.path.join("images", f"{i}.png")})
    path = os.path.join(out_dir, "manifest.csv")
    write_manifest(pd.DataFrame(rows), path)
    return path

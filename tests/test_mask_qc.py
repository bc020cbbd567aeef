"""Mask QC (issue 21): outlying tissue fractions named, contact sheet with overlays."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from ish_tf.data import mask_qc


def _report(rows):
    return pd.DataFrame(rows, columns=["image_id", "donor_id", "status", "tissue_fraction"])


def test_outliers_against_the_donor_and_the_collection():
    rows = [(1, "d1", "ok", 0.60), (2, "d1", "ok", 0.62), (3, "d1", "ok", 0.61),
            (4, "d1", "few_patches", 0.06),                 # the paler scan of issue 21
            (5, "d2", "ok", 0.58), (6, "d2", "no_tissue", 0.0),  # d2: too few, collection
            (7, "d3", "unreadable", 0.0)]                   # not masked: never an outlier
    out = mask_qc.find_outliers(_report(rows))
    assert [(o.image_id, o.group) for o in out] == [(6, "collection"), (4, "donor")]
    assert "image 4 (donor d1): tissue fraction 0.06, its donor's typical 0.60" in out[1].describe()
    line = mask_qc.qc_lines(out, "OUT/mask_qc.html")[0]
    assert line.startswith("warning: 2 image(s)") and "image 6" in line and "mask_qc.html" in line
    # Near-identical fractions never flag a small difference.
    assert mask_qc.find_outliers(_report([(i, "d", "ok", 0.6 + 0.001 * i) for i in range(6)]
                                         + [(9, "d", "ok", 0.7)])) == []


def test_contact_sheet_shows_both_ends_and_the_outliers(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "out" / "masks").mkdir(parents=True)
    manifest, rows = [], []
    for i, frac in enumerate([0.1, 0.5, 0.52, 0.55, 0.9], start=1):
        img = np.full((60, 80, 3), 245, np.uint8)
        img[:, : int(80 * frac)] = (150, 120, 170)
        Image.fromarray(img).save(tmp_path / "images" / f"{i}.jpg")
        mask = np.zeros((60, 80), bool)
        mask[:, : int(80 * frac)] = True
        Image.fromarray(mask).save(tmp_path / "out" / "masks" / f"{i}.png")
        manifest.append({"image_id": i, "gene_symbol": f"G{i}", "path": f"images/{i}.jpg",
                         "width": 80, "height": 60})
        rows.append((i, "d1", "ok", frac))
    sheet = mask_qc.write_contact_sheet(str(tmp_path / "out"), _report(rows),
                                        pd.DataFrame(manifest), str(tmp_path / "m.csv"), n=2,
                                        size=64)
    text = open(sheet, encoding="utf-8").read()
    low, high, outl = (text.index("Lowest"), text.index("Highest"), text.index("Outliers"))
    assert "mask_qc/1.png" in text[low:high] and "mask_qc/5.png" in text[high:outl]
    assert "image 1 (donor d1)" in text[outl:] and "image 5 (donor d1)" in text[outl:]
    with Image.open(tmp_path / "out" / "mask_qc" / "1.png") as im:
        assert max(im.size) <= 80 and im.mode == "RGB"

"""Spatial inputs, labels and patch records of the ISH CNN (`ish_tf.families.ish_cnn.spatial`)."""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ish_tf.families.ish_cnn import sections as section_io
from ish_tf.families.ish_cnn import spatial
from ish_tf.families.ish_cnn.spatial import LabelConfig, SpatialError
from ish_tf.families.ish_cnn.synthetic_pairs import DECOY_GENE, SpatialSynthConfig, generate_pair


def _spots(rows):
    return section_io.spots_frame([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def _write_section(tmp_path, image, rows, mask=None, name="s"):
    img = os.path.join(tmp_path, f"{name}.png")
    Image.fromarray(image).save(img)
    spots = os.path.join(tmp_path, f"{name}.csv")
    pd.DataFrame(rows, columns=["x", "y", "gene"]).to_csv(spots, index=False)
    mpath = ""
    if mask is not None:
        mpath = os.path.join(tmp_path, f"{name}_mask.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(mpath)
    return img, spots, mpath


# --------------------------------------------------------------------------- reading
def test_read_spot_table_scales_and_names_bad_rows(tmp_path):
    path = tmp_path / "spots.csv"
    path.write_text("x,y,gene\n10,20,A\n4,6,B\n")
    df = section_io.read_spot_table(str(path), scale=0.5)
    assert df["x"].tolist() == [5.0, 2.0] and df["y"].tolist() == [10.0, 3.0]
    assert df["gene"].tolist() == ["A", "B"]
    path.write_text("x,y,gene\n10,20,A\n4,oops,B\n")
    with pytest.raises(SpatialError, match=r"line 3, column 'y'.*oops"):
        section_io.read_spot_table(str(path))
    path.write_text("x,y,gene\n")
    with pytest.raises(SpatialError, match="no rows"):
        section_io.read_spot_table(str(path))
    path.write_text("x,y\n1,2\n")
    with pytest.raises(SpatialError, match=r"lacks column\(s\) \['gene'\]"):
        section_io.read_spot_table(str(path))


def test_check_spots_outside_and_unknown_genes():
    spots = _spots([(1, 1, "A"), (9.4, 4, "B"), (10, 2, "A"), (3, -1, "B")])
    with pytest.raises(SpatialError, match=r"line 4: spot \(10, 2\).*outside the 10 x 5.*2 spot"):
        section_io.check_spots(spots, (5, 10), ("A", "B"))
    kept, dropped = section_io.check_spots(spots, (5, 10), ("A", "B"), outside="drop")
    assert dropped == 2 and kept["x"].tolist() == [1, 9.4]
    with pytest.raises(SpatialError, match=r"gene\(s\) \['C'\] have no spots"):
        section_io.check_spots(spots, (5, 10), ("A", "C"), outside="drop")


def test_load_section_mask_size_mismatch_and_16bit(tmp_path):
    image = np.full((20, 30), 200, np.uint8)
    img, spots, mask = _write_section(str(tmp_path), image, [(3, 4, "A")],
                                      mask=np.ones((20, 31), bool))
    with pytest.raises(SpatialError, match=r"mask is 31 x 20 but the image .* is 30 x 20"):
        spatial.load_section(img, spots, mask, genes=["A"])
    a16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    path = os.path.join(str(tmp_path), "s16.png")
    Image.fromarray(a16).save(path)
    grey = section_io.read_section_image(path)
    assert grey.dtype == np.uint8 and grey.max() == 255 and grey.min() == 0
    with pytest.raises(SpatialError, match="cannot read the section image"):
        section_io.read_section_image(os.path.join(str(tmp_path), "missing.tif"))


# --------------------------------------------------------------------------- labels
def test_make_labels_exact_counts_and_radius_exclusion():
    h, w = 40, 60
    mask = np.zeros((h, w), bool)
    mask[5:35, 5:45] = True  # 30 x 40 = 1200 tissue pixels; 2400 - 1200 background
    spots = _spots([
        (10, 10, "A"), (20, 10, "A"), (30, 30, "A"),
        (13, 10, "B"),            # 3 px from the first A spot: both ambiguous at radius 4
        (40, 20, "B"), (40.4, 20.2, "B"),  # same rounded pixel: one centre
        (50, 38, "X"),            # not a chosen gene: ignored, no exclusion zone
    ])
    cfg = LabelConfig(genes=("A", "B"), radius=4, max_per_class=0, balance=False, seed=1)
    lab = spatial.make_labels(spots, mask, cfg)
    s = lab.summary.set_index("class_name")
    assert s.loc["A", "candidates"] == 2 and s.loc["A", "ambiguous"] == 1
    assert s.loc["B", "candidates"] == 1 and s.loc["B", "ambiguous"] == 1
    near = spatial.disc_raster((h, w), spots["x"][:6].to_numpy(), spots["y"][:6].to_numpy(), 4)
    assert s.loc["tissue", "candidates"] == int((mask & ~near).sum())
    assert s.loc["background", "candidates"] == h * w - 1200
    # Without a cap, tissue and background get as many as the largest gene class.
    assert s["kept"].tolist() == [2, 1, 2, 2]
    c = lab.centres
    assert sorted(map(tuple, c[c.label == 0][["x", "y"]].to_numpy())) == [(20, 10), (30, 30)]
    assert c[c.label == 1][["x", "y"]].to_numpy().tolist() == [[40, 20]]
    tissue = c[c.class_name == "tissue"]
    assert mask[tissue.y, tissue.x].all() and not near[tissue.y, tissue.x].any()
    bg = c[c.class_name == "background"]
    assert not mask[bg.y, bg.x].any()
    # Keeping ambiguous spots; balance cuts every class to the smallest.
    lab2 = spatial.make_labels(spots, mask, LabelConfig(genes=("A", "B"), radius=4,
                                                        keep_ambiguous=True, max_per_class=0,
                                                        balance=True))
    assert lab2.summary["kept"].tolist() == [2, 2, 2, 2]
    assert lab2.summary.set_index("class_name").loc["A", "candidates"] == 3
    # Deterministic for a seed.
    again = spatial.make_labels(spots, mask, cfg)
    pd.testing.assert_frame_equal(again.centres, lab.centres)


def test_disc_raster_is_strict_and_ambiguity_uses_radius():
    disc = spatial.disc_raster((9, 9), np.array([4.0]), np.array([4.0]), 2)
    assert disc.sum() == 9  # distance < 2: the 3x3 block and no pixel at distance exactly 2
    spots = _spots([(0, 0, "A"), (2, 0, "B"), (10, 0, "A"), (10, 0, "A")])
    assert spatial.ambiguous_spots(spots, ["A", "B"], 2).tolist() == [False, False, False, False]
    assert spatial.ambiguous_spots(spots, ["A", "B"], 2.01).tolist() == [True, True, False, False]


def test_make_labels_errors():
    spots = _spots([(1, 1, "A")])
    with pytest.raises(SpatialError, match=r"class\(es\) \['background'\]"):
        spatial.make_labels(spots, np.ones((5, 5), bool), LabelConfig(genes=("A",), radius=1))
    with pytest.raises(SpatialError, match="clash"):
        LabelConfig(genes=("tissue",))
    with pytest.raises(SpatialError, match="repeats"):
        LabelConfig(genes=("A", "A"))


# --------------------------------------------------------------------------- patches
def test_crop_patches_centre_convention_and_reflection():
    image = np.arange(10 * 12, dtype=np.uint8).reshape(10, 12)
    p = spatial.crop_patches(image, [5], [4], 4)[0]
    np.testing.assert_array_equal(p, image[2:6, 3:7])  # top-left = centre - size // 2
    p = spatial.crop_patches(image, [5], [4], 5)[0]
    np.testing.assert_array_equal(p, image[2:7, 3:8])
    corner = spatial.crop_patches(image, [0], [0], 4)[0]
    np.testing.assert_array_equal(corner[2:, 2:], image[:2, :2])
    np.testing.assert_array_equal(corner[0, 2:], image[2, :2])  # reflected row


def test_records_round_trip(tmp_path):
    import tensorflow as tf

    from ish_tf.data import shards
    from ish_tf.data.pipeline import patch_dataset, pk_dataset

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (48, 64)).astype(np.uint8)
    mask = np.zeros((48, 64), bool)
    mask[8:40, 8:56] = True
    rows = [(12, 12, "A"), (30, 20, "A"), (50, 35, "B"), (20, 30, "B"), (40, 12, "A")]
    img, spots, mpath = _write_section(str(tmp_path), image, rows, mask)
    out = os.path.join(str(tmp_path), "out")
    cfg = spatial.SpatialConfig(images=(img,), spot_tables=(spots,), masks=(mpath,), out_dir=out,
                                labels=LabelConfig(genes=("A", "B"), radius=3, max_per_class=0,
                                                   balance=False),
                                patch_sizes=(8, 16), validation_fraction=0.0)
    result = spatial.run_spatial(cfg)
    assert result["classes"] == ["A", "B", "tissue", "background"]
    labels = pd.read_csv(result["labels"])
    assert labels["label"].value_counts().sort_index().tolist() == [3, 2, 3, 3]
    for size in (8, 16):
        rdir = spatial.records_dir_for(out, size)
        info = shards.load_dataset_info(rdir)
        assert info.patch_size == size and [g.gene_symbol for g in info.genes] == result["classes"]
        ds = patch_dataset(rdir, "train", batch_size=100, training=False, with_keys=True)
        images, keys = next(iter(ds))
        assert images.shape == (11, size, size, 3)
        for img_t, x, y, lab, g in zip(images.numpy(), keys["x"].numpy(), keys["y"].numpy(),
                                       keys["label"].numpy(), keys["gene_symbol"].numpy(), strict=True):
            want = spatial.crop_patches(image, [x], [y], size)[0]
            np.testing.assert_array_equal(img_t[..., 0], want)  # PNG: lossless
            assert g.decode() == result["classes"][lab]
        # Class-balanced batches from the P×K reader: labels = class indices.
        x, y = next(iter(pk_dataset(rdir, "train", P=4, K=2, flips=False)))
        assert sorted(tf.unique(y)[0].numpy().tolist()) == [0, 1, 2, 3]
    # Rerun: complete record sets are kept.
    again = spatial.run_spatial(cfg)
    assert all(r["reused"] for r in again["records"].values())
    text = spatial.format_summary(again)
    assert "p16" in text and "A: 3 kept" in text


def test_spatial_config_validation():
    lab = LabelConfig(genes=("A",))
    with pytest.raises(SpatialError, match="--spot_tables has 0"):
        spatial.SpatialConfig(images=("a.png",), spot_tables=(), out_dir="o", labels=lab).validate()
    with pytest.raises(SpatialError, match="repeats a size"):
        spatial.SpatialConfig(images=("a.png",), spot_tables=("a.csv",), out_dir="o", labels=lab,
                              patch_sizes=(8, 8)).validate()


# --------------------------------------------------------------------------- synthetic
def test_synthetic_pair(tmp_path):
    cfg = SpatialSynthConfig(out_dir=str(tmp_path), height=128, width=160, seed=3)
    table = generate_pair(cfg)
    assert len(table) == 2
    sections = []
    for row in table.itertuples():
        sec = spatial.load_section(row.image, row.spots, row.mask, genes=cfg.genes)
        assert sec.shape == (128, 160) and sec.dropped_spots == 0
        cells = pd.read_csv(row.cells)
        # Gene populations have their own morphology: population 0 larger, 1 elongated.
        size = cells.groupby("population")[["radius_x", "radius_y"]].mean()
        assert size.loc[0, "radius_y"] > 1.3 * size.loc[-1, "radius_y"]
        assert (size.loc[1, "radius_x"] / size.loc[1, "radius_y"]) > 1.8
        # Spots of each gene sit on its cells (up to noise and false positives), and
        # background pixels are brighter than tissue.
        counts = sec.spots["gene"].value_counts()
        assert set(counts.index) <= set(cfg.genes) | {DECOY_GENE} and counts[cfg.genes[0]] > 3
        assert sec.image[~sec.mask].mean() > sec.image[sec.mask].mean() + 10
        sections.append(sec)
    # Two animals differ (independent test section); the generator is deterministic.
    assert not np.array_equal(sections[0].mask, sections[1].mask)
    again = SpatialSynthConfig(out_dir=str(tmp_path / "again"), height=128, width=160, seed=3)
    t2 = generate_pair(again)
    np.testing.assert_array_equal(section_io.read_section_image(t2["image"][0]), sections[0].image)


def test_fluorescence_sections_from_the_flags(tmp_path):
    """--mask_background=dark reaches the computed masks of bin/spatial and bin/predict."""
    from test_segment import _fluorescence

    from ish_tf import cli
    from ish_tf.cli import predict as predict_cli
    from ish_tf.cli import spatial as spatial_cli

    yy, xx = np.mgrid[0:160, 0:200]
    truth = ((yy - 80) / 60) ** 2 + ((xx - 100) / 80) ** 2 < 1
    img, spots, _ = _write_section(tmp_path, _fluorescence(truth, 0), [(100, 80, "A")])
    fv = cli.parse("spatial", [f"--section_images={img}", f"--spot_tables={spots}", "--genes=A",
                               f"--out={tmp_path / 'out'}", "--mask_background=dark"])
    cfg, _ = spatial_cli.spatial_config(fv)
    fv = cli.parse("predict", [f"--model_dirs={tmp_path}", f"--section_image={img}",
                               f"--spot_table={spots}", f"--out={tmp_path / 'pred'}",
                               "--mask_background=dark"])
    pred = predict_cli.segmentation_config(fv)
    assert cfg.mask_config.background == pred.mask_config.background == "dark"
    sec = spatial.load_section(img, spots, genes=["A"], mask_config=cfg.mask_config)
    assert (sec.mask & truth).sum() / (sec.mask | truth).sum() > 0.95
    with mock.patch.object(section_io.logging, "warning") as warn:
        default = spatial.load_section(img, spots, genes=["A"])  # brightfield default
    assert default.mask[~truth].mean() > 0.9  # the black slide is "tissue"
    assert "looks like a section on a dark background" in warn.call_args[0][0] % warn.call_args[0][1:]


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    """A small PNG declaring 30000 x 30000 pixels (900 MP) is refused from its header,
    naming the file and --max_pixels, and Pillow's process-wide limit stays in force."""
    import struct
    import zlib

    from PIL import Image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    side = 30000
    row = b"\x00" + b"\x00" * side
    body = zlib.compress(row * 64, 9)  # only the first rows: the header is what counts
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    assert path.stat().st_size < 100_000
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(spatial.SpatialError, match=r"bomb\.png.*30000x30000.*--max_pixels"):
        section_io.read_section_image(str(path))
    assert Image.MAX_IMAGE_PIXELS == before and before is not None
    # A genuine large image passes when the limit allows it (here a small one, limit tight).
    ok = tmp_path / "ok.png"
    Image.fromarray(np.full((40, 50), 200, np.uint8)).save(ok)
    assert section_io.read_section_image(str(ok), max_pixels=2000).shape == (40, 50)
    with pytest.raises(spatial.SpatialError, match="--max_pixels=1,999"):
        section_io.read_section_image(str(ok), max_pixels=1999)

"""Large and whole-slide images (issue 21): pyramids, tiles, reduced JPEG, explicit limits,
physical scale from ingest to extraction."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ish_tf.data import image_io as I

tifffile = pytest.importorskip("tifffile")


def _section(h: int = 200, w: int = 300, seed: int = 0) -> np.ndarray:
    """A smooth section-like RGB image: a dark ellipse with texture on a white slide."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
    base = np.where(inside[..., None], [170, 140, 190], [248, 248, 250]).astype(np.float32)
    base += rng.normal(0, 6, (h, w, 1)) * inside[..., None]
    return np.clip(base, 0, 255).astype(np.uint8)


def _reduce(a: np.ndarray, n: int) -> np.ndarray:
    return a if n == 1 else np.asarray(Image.fromarray(a).reduce(n))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("io")
    rgb = _section()
    with tifffile.TiffWriter(d / "pyr.ome.tif", ome=True) as tw:
        tw.write(rgb, tile=(64, 64), subifds=2, compression="zlib",
                 metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        for n in (2, 4):
            tw.write(_reduce(rgb, n), tile=(64, 64), subfiletype=1, compression="zlib")
    tifffile.imwrite(d / "tiled.tif", rgb, tile=(48, 48), resolution=(1e4 / 0.8, 1e4 / 0.8),
                     resolutionunit="CENTIMETER")
    Image.fromarray(rgb).save(d / "sec.jpg", quality=95)
    return d, rgb


def test_pyramid_and_tiles_read_only_what_is_needed(files):
    d, rgb = files
    info = I.image_info(str(d / "pyr.ome.tif"))
    assert info.levels == ((300, 200), (150, 100), (75, 50)) and info.um_per_pixel == 0.5
    assert I.image_info(str(d / "tiled.tif")).um_per_pixel == pytest.approx(0.8)
    for n in (1, 2, 4):  # the level itself
        assert np.array_equal(I.read_image(str(d / "pyr.ome.tif"), n), _reduce(rgb, n)), n
    # No level divides 3: the full level is reduced tile by tile (rounding apart, the same).
    assert np.abs(I.read_image(str(d / "pyr.ome.tif"), 3).astype(int) - _reduce(rgb, 3)).max() <= 1
    # Tiles (48 px: not a multiple of 4 at the image's edge, nor of 3 anywhere) are reduced
    # one at a time, to the same pixels as reducing the whole image, up to rounding.
    for n in (2, 3, 4):
        got = I.read_image(str(d / "tiled.tif"), n).astype(int)
        assert got.shape == _reduce(rgb, n).shape and np.abs(got - _reduce(rgb, n)).max() <= 1


def test_jpeg_reduced_decoding_and_the_explicit_limit(files):
    d, rgb = files
    path = str(d / "sec.jpg")
    small = I.read_image(path, 4)
    assert small.shape == _reduce(rgb, 4).shape
    assert np.abs(small.astype(int) - _reduce(rgb, 4)).mean() < 3
    # max_pixels bounds what is decoded: the full image is refused, a 1/4 decode is not.
    with pytest.raises(I.ImageReadError, match="--max_pixels=10,000.*--downsample"):
        I.read_image(path, 1, max_pixels=10_000)
    assert I.read_image(path, 4, max_pixels=10_000).shape == small.shape
    # Pillow's own limit neither stops nor warns; it is restored afterwards.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1_000
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert I.read_image(path).shape == rgb.shape
            assert I.image_info(path).width == 300
        assert Image.MAX_IMAGE_PIXELS == 1_000
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    if not _has_openslide():
        (d / "x.svs").write_bytes(b"II*\x00")
        with pytest.raises(I.ImageReadError, match="openslide"):
            I.read_image(str(d / "x.svs"))


def _has_openslide() -> bool:
    try:
        import openslide  # noqa: F401
    except ImportError:
        return False
    return True


def test_allen_rows_carry_the_scale_of_the_downloaded_image():
    from ish_tf.data import allen, allen_query

    row = {"image_id": 1, "um_per_pixel": 1.049, allen_query.FULL_WIDTH_KEY: 8929}
    done = allen._complete(row, (2232, 1676), "/d/images/1.jpg", "/d/manifest.csv", 2)
    assert done["um_per_pixel"] == pytest.approx(1.049 * 8929 / 2232)
    assert allen_query.FULL_WIDTH_KEY not in done
    no_width = dict(row, **{allen_query.FULL_WIDTH_KEY: None})
    assert allen._complete(no_width, (100, 80), "/d/1.jpg", "/d/m.csv", 3)["um_per_pixel"] == \
        pytest.approx(1.049 * 8)


def test_same_section_at_two_resolutions_gives_windows_of_the_same_tissue(files, tmp_path):
    """bin/ingest takes the scale from a table column and from TIFF metadata, and records
    --downsample; bin/extract --source_um cuts windows of one physical size from both."""
    from ish_tf.data import patches as P
    from ish_tf.data import shards
    from ish_tf.data.ingest import IngestConfig, ingest

    d, _ = files
    big = _section(400, 600, seed=1)
    Image.fromarray(big).save(tmp_path / "fine.jpg", quality=95)          # 1 µm/px
    tifffile.imwrite(tmp_path / "coarse.tif", _reduce(big, 2), tile=(64, 64),  # 2 µm/px
                     resolution=(1e4 / 2.0, 1e4 / 2.0), resolutionunit="CENTIMETER")
    Image.fromarray(_reduce(big, 8)[:15, :15]).save(tmp_path / "tiny.png")  # 8 µm/px
    pd.DataFrame({"path": ["fine.jpg", "coarse.tif", "tiny.png"], "gene_symbol": ["A", "B", "C"],
                  "um_per_pixel": ["1.0", "", "8"]}).to_csv(tmp_path / "t.csv", index=False)
    res = ingest(IngestConfig(out=str(tmp_path / "m"), table=str(tmp_path / "t.csv"),
                              images=str(tmp_path)))
    um = dict(zip(res.manifest["path"].map(os.path.basename), res.manifest["um_per_pixel"],
                  strict=True))
    assert um == {"fine.jpg": 1.0, "coarse.tif": pytest.approx(2.0), "tiny.png": 8.0}
    cfg = P.ExtractConfig(manifest=res.manifest_path, out_dir=str(tmp_path / "r"),
                          source_um=160, patch_size=40, patches_per_image=3, max_tries=200,
                          min_fraction=0.9, num_shards=1, split_fractions=(1, 0, 0),
                          image_format="png")
    P.run_extract(cfg)
    report = pd.read_csv(tmp_path / "r" / P.REPORT_NAME).set_index("gene_symbol")
    assert report.loc["C", "status"] == "too_small"
    assert "image is 15x15, smaller than source_size 20 (160 um at 8 um/px)" in report.loc["C", "reason"]
    got = {}
    for shard in shards.load_index(str(tmp_path / "r"))["shards"]:
        for ex in _examples(tmp_path / "r", shard):
            got.setdefault(ex["gene_symbol"], []).append(ex)
    assert {e["source_size"] for e in got["A"]} == {160}
    assert {e["source_size"] for e in got["B"]} == {80}
    # Each window of the coarse copy shows the tissue of the same window of the fine one.
    for e in got["B"]:
        x, y = e["x"] * 2, e["y"] * 2
        ref = np.asarray(Image.fromarray(big).resize((40, 40), Image.LANCZOS,
                                                     box=(x, y, x + 160, y + 160)))
        assert np.abs(e["image"].astype(int) - ref).mean() < 6


def _examples(out, shard):
    import tensorflow as tf

    from ish_tf.data import records

    for raw in tf.data.TFRecordDataset(os.path.join(out, shard["file"])):
        f = records.parse_example(raw, ["gene_symbol", "x", "y", "source_size",
                                        "image/encoded"])
        yield {"gene_symbol": f["gene_symbol"].numpy().decode(), "x": int(f["x"]),
               "y": int(f["y"]), "source_size": int(f["source_size"]),
               "image": np.asarray(tf.io.decode_png(f["image/encoded"]))}


def test_ingest_records_the_level_and_extraction_reads_it(files, tmp_path):
    from ish_tf.data import patch_sampling as S
    from ish_tf.data import patches as P
    from ish_tf.data.ingest import IngestConfig, IngestError, ingest

    d, _ = files
    pd.DataFrame({"path": ["pyr.ome.tif", "sec.jpg"], "gene_symbol": ["A", "B"]}).to_csv(
        tmp_path / "t.csv", index=False)
    table = str(tmp_path / "t.csv")
    res = ingest(IngestConfig(out=str(tmp_path / "m"), table=table, images=str(d), downsample=2))
    m = res.manifest.set_index("gene_symbol")
    assert list(m["read_downsample"]) == [2, 2] and list(m["width"]) == [300, 300]
    assert m.loc["A", "um_per_pixel"] == 0.5 and pd.isna(m.loc["B", "um_per_pixel"])
    with pytest.raises(IngestError, match="--target_um=2 needs .* sec.jpg"):
        ingest(IngestConfig(out=str(tmp_path / "m2"), table=table, images=str(d), target_um=2))
    res = ingest(IngestConfig(out=str(tmp_path / "m3"), table=table, images=str(d),
                              target_um=2, um_per_pixel=0.5))
    assert list(res.manifest["read_downsample"]) == [4, 4]
    cfg = P.ExtractConfig(manifest=res.manifest_path, out_dir=str(tmp_path / "r"),
                          source_um=16, patch_size=8, patches_per_image=2, max_tries=50)
    row = next(res.manifest.itertuples(index=False))
    own = P.image_config(cfg, row)
    assert (own.read_downsample, own.source_size) == (4, 8)
    result = S.extract_image_patches(str(d / row.path.split("/")[-1]), int(row.image_id), own)
    assert (result.width, result.height) == (75, 50) and result.n_patches == 2
    assert P.size_mismatch(row, result) == ""
    with pytest.raises(P.ExtractError, match="um_per_pixel"):
        P.check_scale(pd.DataFrame({"image_id": [1], "um_per_pixel": [None]}), cfg)

"""Patch sampling: summed-area tables, the sampling constraint, determinism, per-image outcomes."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from ish_tf.data import patch_sampling as S
from ish_tf.data import patches as P
from ish_tf.data.segment import MaskConfig


def _blob_mask(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A few random filled ellipses: tissue-like masks with edges and gaps."""
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros((h, w), bool)
    for _ in range(3):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 6, h / 2), rng.uniform(w / 6, w / 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


def test_integral_image_window_sums_match_brute_force():
    rng = np.random.default_rng(1)
    for h, w, size in [(37, 53, 7), (64, 64, 64), (10, 200, 10), (90, 31, 1)]:
        mask = rng.random((h, w)) < 0.6
        sat = S.integral_image(mask)
        assert sat.shape == (h + 1, w + 1)
        assert sat[-1, -1] == mask.sum()
        ys = rng.integers(0, h - size + 1, 40)
        xs = rng.integers(0, w - size + 1, 40)
        # Edge windows: every corner of the valid range.
        ys = np.concatenate([ys, [0, 0, h - size, h - size]])
        xs = np.concatenate([xs, [0, w - size, 0, w - size]])
        got = S.window_sums(sat, ys, xs, size)
        want = np.array([mask[y:y + size, x:x + size].sum() for y, x in zip(ys, xs, strict=True)])
        np.testing.assert_array_equal(got, want)


def test_integral_image_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        S.integral_image(np.zeros((4, 4, 3), bool))


@pytest.mark.parametrize("min_fraction", [0.5, 0.9, 1.0])
def test_every_sampled_patch_meets_the_fraction_and_matches_naive(min_fraction):
    rng = np.random.default_rng(2)
    mask = _blob_mask(rng, 300, 400)
    size = 48
    fast = S.sample_patches(mask, n=30, size=size, min_fraction=min_fraction, max_tries=400,
                            rng=np.random.default_rng(7))
    naive = S.naive_sample_patches(mask, n=30, size=size, min_fraction=min_fraction,
                                   max_tries=400, rng=np.random.default_rng(7))
    assert fast == naive
    assert len(fast) > 0
    assert len(set(fast)) == len(fast)
    for x, y in fast:
        assert 0 <= x <= 400 - size and 0 <= y <= 300 - size
        assert mask[y:y + size, x:x + size].mean() >= min_fraction


def test_block_counts_and_bounds_match_brute_force():
    rng = np.random.default_rng(4)
    mask = _blob_mask(rng, 203, 261) ^ (rng.random((203, 261)) < 0.05)  # ragged edges
    counts = S.block_counts(mask)
    assert counts.shape == (25, 32)
    want = mask[:200, :256].reshape(25, 8, 32, 8).sum(axis=(1, 3))
    np.testing.assert_array_equal(counts, want)
    bsat = S.integral_image(counts)
    size = 130
    ys = np.concatenate([rng.integers(0, 203 - size + 1, 60), [0, 203 - size]])
    xs = np.concatenate([rng.integers(0, 261 - size + 1, 60), [0, 261 - size]])
    lo, hi = S._window_bounds(bsat, ys, xs, size, S.BLOCK)
    exact = np.array([mask[y:y + size, x:x + size].sum() for y, x in zip(ys, xs, strict=True)])
    assert (lo <= exact).all() and (exact <= hi).all()
    # Bounds are tight: they differ by at most the border band of the window.
    assert (hi - lo).max() <= 4 * 8 * size + 2 * 8 * size


@pytest.mark.parametrize("min_fraction", [0.5, 0.8, 0.9, 1.0])
def test_large_window_sampling_matches_naive(min_fraction):
    rng = np.random.default_rng(5)
    mask = _blob_mask(rng, 531, 613)
    for size in (128, 203):
        fast = S.sample_patches(mask, n=40, size=size, min_fraction=min_fraction,
                                max_tries=300, rng=np.random.default_rng(size))
        naive = S.naive_sample_patches(mask, n=40, size=size, min_fraction=min_fraction,
                                       max_tries=300, rng=np.random.default_rng(size))
        assert fast == naive
        for x, y in fast:
            assert mask[y:y + size, x:x + size].mean() >= min_fraction


def test_sampling_stops_at_n_and_respects_max_tries():
    mask = np.ones((100, 100), bool)
    got = S.sample_patches(mask, n=5, size=10, min_fraction=0.9, max_tries=500,
                           rng=np.random.default_rng(0))
    assert len(got) == 5
    # Only the top-left quarter is tissue: with 3 tries, at most 3 patches.
    mask = np.zeros((100, 100), bool)
    mask[:50, :50] = True
    got = S.sample_patches(mask, n=50, size=10, min_fraction=1.0, max_tries=3,
                           rng=np.random.default_rng(0))
    assert len(got) <= 3


def test_sampling_edge_cases():
    rng = np.random.default_rng(0)
    assert S.sample_patches(np.ones((20, 20), bool), n=5, size=21, min_fraction=0.5,
                            max_tries=10, rng=rng) == []
    assert S.sample_patches(np.zeros((50, 50), bool), n=5, size=10, min_fraction=0.5,
                            max_tries=50, rng=rng) == []
    # A window exactly the size of the image.
    assert S.sample_patches(np.ones((20, 20), bool), n=5, size=20, min_fraction=1.0,
                            max_tries=10, rng=rng) == [(0, 0)]


def test_image_rng_depends_only_on_seed_and_image_id():
    a = S.image_rng(3, 123456).integers(0, 1 << 30, 5)
    b = S.image_rng(3, 123456).integers(0, 1 << 30, 5)
    c = S.image_rng(3, 123457).integers(0, 1 << 30, 5)
    d = S.image_rng(4, 123456).integers(0, 1 << 30, 5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


# --------------------------------------------------------------------------- per image
def _section(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A simple ISH-like image: cream slide, pale purple tissue ellipse, dark cells."""
    img = np.empty((h, w, 3), np.float32)
    img[:] = (246, 244, 236)
    yy, xx = np.mgrid[0:h, 0:w]
    tissue = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 <= 1
    img[tissue] = (222, 212, 226)
    cells = tissue & (rng.random((h, w)) < 0.01)
    img[cells] = (90, 70, 150)
    img += rng.normal(0, 2, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(_section(300, 360, rng)).save(tmp_path / "ok.jpg", quality=92)
    Image.fromarray(_section(60, 70, rng)).save(tmp_path / "small.jpg")
    Image.fromarray(np.full((300, 360, 3), (246, 244, 236), np.uint8)).save(tmp_path / "blank.png")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image" * 10)
    return tmp_path


def _cfg(tmp_path, **kw) -> P.ExtractConfig:
    base = dict(manifest=str(tmp_path / "manifest.csv"), out_dir=str(tmp_path / "out"),
                patches_per_image=6, source_size=64, patch_size=32, min_fraction=0.9,
                max_tries=200, seed=5)
    base.update(kw)
    return P.ExtractConfig(**base)


def test_extract_image_patches_ok_and_deterministic(image_dir):
    cfg = _cfg(image_dir)
    a = S.extract_image_patches(str(image_dir / "ok.jpg"), 11, cfg, str(image_dir / "masks"))
    assert a.status == S.OK, a.reason
    assert a.n_patches == 6 and (a.width, a.height) == (360, 300)
    assert 0.3 < a.tissue_fraction < 0.7
    assert os.path.exists(image_dir / "masks" / "11.png")
    for p in a.patches:
        with Image.open(io.BytesIO(p.encoded)) as im:
            assert im.format == "JPEG" and im.size == (32, 32)
    # Same (seed, image_id) -> same windows and bytes, now with the cached mask.
    b = S.extract_image_patches(str(image_dir / "ok.jpg"), 11, cfg, str(image_dir / "masks"))
    assert b.mask_cached and [(p.x, p.y, p.encoded) for p in b.patches] == \
        [(p.x, p.y, p.encoded) for p in a.patches]
    # Another image id draws other windows.
    c = S.extract_image_patches(str(image_dir / "ok.jpg"), 12, cfg)
    assert [(p.x, p.y) for p in c.patches] != [(p.x, p.y) for p in a.patches]
    png = S.extract_image_patches(str(image_dir / "ok.jpg"), 11, _cfg(image_dir, image_format="png"))
    assert png.patches[0].encoded[:8] == b"\x89PNG\r\n\x1a\n"


def test_extract_image_patches_bad_images(image_dir):
    cfg = _cfg(image_dir)
    small = S.extract_image_patches(str(image_dir / "small.jpg"), 1, cfg)
    assert small.status == S.TOO_SMALL and "smaller than source_size 64" in small.reason
    blank = S.extract_image_patches(str(image_dir / "blank.png"), 2, cfg)
    assert blank.status == S.NO_TISSUE and blank.n_patches == 0
    for name in ("truncated.jpg", "garbage.jpg", "missing.jpg"):
        r = S.extract_image_patches(str(image_dir / name), 3, cfg)
        assert r.status == S.UNREADABLE and name in r.reason, r
    few = S.extract_image_patches(str(image_dir / "ok.jpg"), 4,
                                  _cfg(image_dir, patches_per_image=50, max_tries=20))
    assert few.status == S.FEW_PATCHES and 0 < few.n_patches < 20
    assert f"{few.n_patches} of 50" in few.reason


def test_extract_config_validation(tmp_path):
    with pytest.raises(P.ExtractError, match="image_format"):
        _cfg(tmp_path, image_format="gif")
    with pytest.raises(P.ExtractError, match="min_fraction"):
        _cfg(tmp_path, min_fraction=1.5)
    with pytest.raises(P.ExtractError, match="split_by"):
        _cfg(tmp_path, split_by="region")
    assert _cfg(tmp_path).mask == MaskConfig()

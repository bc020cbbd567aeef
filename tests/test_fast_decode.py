"""Reduced-scale JPEG extraction: the same windows for the same mask, faithful crops, fallbacks."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image

from ish_tf.data import fast_decode as F
from ish_tf.data import patch_sampling as S
from ish_tf.data import patches as P
from ish_tf.data.segment import load_mask


def _psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2).mean())
    return 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))


def test_decode_scale_is_the_largest_dct_scale_dividing_the_factor():
    assert [F.decode_scale(s, r) for s, r in [(1024, 256), (512, 256), (1024, 128),
                                              (2048, 128), (768, 256), (1000, 256),
                                              (256, 256), (96, 32)]] == [4, 2, 8, 8, 1, 1, 1, 1]


@pytest.mark.parametrize("d", [2, 4, 8])
def test_scaled_sampling_picks_the_windows_of_the_full_resolution_mask(d):
    """For the mask M[y, x] = m[y // d, x // d] (partial last blocks included) and one
    seed, sampling on m at scale d picks exactly `sample_patches(M)`'s windows, both for
    exact scoring (small S) and the 8x8 block bounds (S >= 128)."""
    rng = np.random.default_rng(d)
    found = {}
    for trial in range(6):
        h, w = (int(v) for v in rng.integers(40, 90, 2))
        m = rng.random((h, w)) < 0.93
        m[rng.integers(0, h, 2)] = False  # stripes: windows straddle the threshold
        height, width = h * d - int(rng.integers(0, d)), w * d - int(rng.integers(0, d))
        full = np.kron(m, np.ones((d, d), bool))[:height, :width]
        for size in (d, 3 * d + 1, 130, min(height, width) - 1):
            kw = dict(n=25, size=size, min_fraction=0.85, max_tries=300)
            want = S.sample_patches(full, rng=S.image_rng(1, trial), **kw)
            got = F.sample_patches_scaled(m, d, height, width, rng=S.image_rng(1, trial), **kw)
            assert got == want, (d, trial, size)
            found[size > 100] = found.get(size > 100, 0) + len(want)
    assert found[False] > 0 and found[True] > 0  # both scorings were exercised


def test_scaled_window_sums_match_brute_force():
    rng = np.random.default_rng(3)
    m = rng.random((23, 31)) < 0.5
    d, height, width = 4, 23 * 4 - 3, 31 * 4 - 1
    full = np.kron(m, np.ones((d, d), bool))[:height, :width]
    for size in (4, 5, 17, 40):
        ys = rng.integers(0, height - size + 1, 50)
        xs = rng.integers(0, width - size + 1, 50)
        got = F.scaled_window_sums(S.integral_image(m), d, ys, xs, size)
        want = [full[y:y + size, x:x + size].sum() for y, x in zip(ys, xs, strict=True)]
        np.testing.assert_array_equal(got, want)


def _section(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Cream slide, a tissue ellipse with smooth texture and a few dark cells."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.float32)
    img[:] = (246, 244, 236)
    tissue = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 <= 1
    shade = 12 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    img[tissue] = np.array([214, 204, 222], np.float32) + shade[tissue, None]
    cells = tissue & (rng.random((h, w)) < 0.002)
    img[cells] = (90, 70, 150)
    img += rng.normal(0, 1.5, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast")
    Image.fromarray(_section(401, 522)).save(d / "s.jpg", quality=92)
    Image.fromarray(_section(401, 522)).save(d / "s.png")
    return d


def _cfg(d, **kw) -> P.ExtractConfig:
    base = dict(manifest=str(d / "manifest.csv"), out_dir=str(d / "out"), patches_per_image=8,
                source_size=128, patch_size=32, min_fraction=0.9, max_tries=300, seed=3,
                fast_decode=True)
    base.update(kw)
    return P.ExtractConfig(**base)


def test_fast_extraction_crops_the_sampled_windows_faithfully(jpeg, tmp_path):
    cfg = _cfg(jpeg)
    res = F.extract_image_patches_fast(str(jpeg / "s.jpg"), 7, cfg, str(tmp_path))
    assert res.status == S.OK, res.reason
    assert (res.width, res.height) == (522, 401) and res.n_patches == 8
    # The cached mask is at the decode scale (1/4), and the windows are exactly those the
    # full-resolution sampler picks on the full mask it stands for.
    small = load_mask(os.path.join(tmp_path, "7.png"))
    assert small.shape == (101, 131)
    full_mask = np.kron(small, np.ones((4, 4), bool))[:401, :522]
    want = S.sample_patches(full_mask, n=8, size=128, min_fraction=0.9, max_tries=300,
                            rng=S.image_rng(3, 7))
    assert [(p.x, p.y) for p in res.patches] == want
    # Each patch is the window's content: close to the full-resolution Lanczos patch.
    full = Image.open(jpeg / "s.jpg").convert("RGB")
    for p in res.patches:
        with Image.open(io.BytesIO(p.encoded)) as im:
            assert im.format == "JPEG" and im.size == (32, 32)
            assert _psnr(im.convert("RGB"),
                         S.crop_and_resize(full, p.x, p.y, 128, 32)) > 35
    # Deterministic, and the cached mask gives the same bytes.
    again = F.extract_image_patches_fast(str(jpeg / "s.jpg"), 7, cfg, str(tmp_path))
    assert again.mask_cached
    assert [p.encoded for p in again.patches] == [p.encoded for p in res.patches]


def test_crop_decode_scale_leaves_a_lanczos_reduce_of_at_least_two():
    assert [F.crop_decode_scale(s, r) for s, r in [(1024, 256), (512, 256), (1024, 128),
                                                   (2048, 128), (4096, 128), (768, 256),
                                                   (256, 256)]] == [2, 1, 4, 8, 8, 1, 1]


def test_window_cropper_is_the_per_window_lanczos_of_the_reduced_decode(jpeg):
    """Phase-shared horizontal passes give exactly the per-window Lanczos resize from the
    1/2 decode, at every phase and at the image edges; and it stays close to the
    full-resolution Lanczos patch where a crop of the 1/4 decode did not."""
    half, w, h = F.open_scaled(str(jpeg / "s.jpg"), 2)
    assert half.size == (261, 201) and (w, h) == (522, 401)
    cropper = F.WindowCropper(half, 2, 128, 32)
    full = Image.open(jpeg / "s.jpg").convert("RGB")
    quarter, _, _ = F.open_scaled(str(jpeg / "s.jpg"), 4)
    new_db, old_db = [], []
    for x, y in [(0, 0), (w - 128, h - 128), (201, 160), (202, 163), (203, 1), (0, 270)]:
        got = cropper.crop(x, y)
        want = half.resize((32, 32), Image.LANCZOS, box=(x / 2, y / 2, (x + 128) / 2,
                                                           (y + 128) / 2))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"{x},{y}")
        ref = S.crop_and_resize(full, x, y, 128, 32)
        old = quarter.resize((32, 32), Image.LANCZOS, box=(x / 4, y / 4, (x + 128) / 4,
                                                             (y + 128) / 4))
        new_db.append(_psnr(got, ref))
        old_db.append(_psnr(old, ref))
    assert min(new_db) > 40 and min(new_db) > min(old_db) + 3, (new_db, old_db)
    assert sorted(cropper._phases) == [0, 1, 2, 3]  # one horizontal pass per phase


def test_other_formats_and_factors_keep_the_full_resolution_path(jpeg):
    png = F.extract_image_patches_fast(str(jpeg / "s.png"), 7, _cfg(jpeg))
    ref = S.extract_image_patches(str(jpeg / "s.png"), 7, _cfg(jpeg))
    assert png.status == S.OK and [p.encoded for p in png.patches] == \
        [p.encoded for p in ref.patches]
    odd = _cfg(jpeg, source_size=96, patch_size=40)  # 2.4x: not an integer factor
    a = F.extract_image_patches_fast(str(jpeg / "s.jpg"), 7, odd)
    b = S.extract_image_patches(str(jpeg / "s.jpg"), 7, odd)
    assert [p.encoded for p in a.patches] == [p.encoded for p in b.patches]
    # The flag selects the path; bad files keep their statuses.
    assert F.extract_patches(str(jpeg / "nope.jpg"), 1, _cfg(jpeg)).status == S.UNREADABLE
    (jpeg / "bad.jpg").write_bytes(b"not a jpeg" * 20)
    assert "cannot decode" in F.extract_patches(str(jpeg / "bad.jpg"), 1, _cfg(jpeg)).reason


def test_fast_decode_is_part_of_the_sampling_key_only_when_on(jpeg):
    assert "fast_decode" not in _cfg(jpeg, fast_decode=False).sampling_key()
    assert _cfg(jpeg).sampling_key()["fast_decode"] is True


def test_factor_two_crops_from_the_full_decode_and_masks_at_half(jpeg, tmp_path):
    """S / R = 2: the mask is at 1/2, the patches are the full path's Lanczos patches."""
    cfg = _cfg(jpeg, source_size=64, patch_size=32)
    res = F.extract_image_patches_fast(str(jpeg / "s.jpg"), 7, cfg, str(tmp_path))
    assert res.status == S.OK and res.n_patches == 8
    assert load_mask(os.path.join(tmp_path, "7.png")).shape == (201, 261)
    full = Image.open(jpeg / "s.jpg").convert("RGB")
    for p in res.patches:
        want = S.encode_patch(S.crop_and_resize(full, p.x, p.y, 64, 32), cfg.image_format,
                              cfg.jpeg_quality)
        assert p.encoded == want, (p.x, p.y)

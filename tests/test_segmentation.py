"""Dense prediction, ground truth rasterisation, Dice and `bin/predict` (`ish_tf.families.ish_cnn.segmentation`)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from ish_tf.families.ish_cnn import segmentation as seg
from ish_tf.families.ish_cnn.config import IshCnnConfig
from ish_tf.families.ish_cnn.sections import spots_frame


def test_dice_on_hand_made_masks():
    truth = np.array([[0, 0, 1, 1],
                      [0, 2, 2, 1],
                      [3, 3, 3, seg.IGNORE]])
    pred = np.array([[0, 1, 1, 1],
                     [0, 2, 3, 0],
                     [3, 3, 2, 2]])
    d = seg.dice_scores(pred, truth, 5)
    # class 0: truth 3 px, pred 3 px (one of them at (1, 3), where truth is 1), overlap 2.
    assert d[0] == pytest.approx(4 / 6)
    assert d[1] == pytest.approx(2 * 2 / (3 + 3))
    assert d[2] == pytest.approx(2 * 1 / (2 + 2))  # the 2 at (2,3) is on IGNORE: not counted
    assert d[3] == pytest.approx(2 * 2 / (3 + 3))
    assert np.isnan(d[4])
    np.testing.assert_allclose(seg.dice_scores(truth, truth, 4), 1.0)
    row = seg.dice_row("m", pred, truth, ["a", "b", "c", "d", "e"])
    assert row["mean_dice"] == pytest.approx(np.nanmean(d))
    assert row["pixel_accuracy"] == pytest.approx(7 / 11)


def test_rasterize_truth_and_baselines():
    mask = np.zeros((10, 12), bool)
    mask[2:8, 2:10] = True
    spots = spots_frame([3, 5, 9, 1], [3, 3, 6, 9], ["A", "B", "A", "C"])
    truth = seg.rasterize_truth(mask.shape, spots, mask, ["A", "B"], radius=1.5)
    assert truth[3, 4] == seg.IGNORE  # in both discs (1 px from each spot)
    assert truth[3, 3] == 0  # 2 px from the B spot: outside its disc
    assert truth[4, 3] == 0 and truth[3, 5] == 1 and truth[6, 9] == 0
    assert truth[9, 1] == 3  # gene C is no class: background there
    assert truth[5, 6] == 2 and truth[0, 0] == 3
    base = seg.baseline_maps(truth, 4, seed=0)
    assert (base["majority"] == 3).all()  # background is the commonest class here
    freq = np.bincount(base["random"].ravel(), minlength=4) / truth.size
    assert freq[3] > freq[0]


def test_grid_to_pixels_nearest_centre():
    grid = np.arange(3 * 2).reshape(3, 2, 1).astype(np.float32)
    px = seg.grid_to_pixels(grid, (9, 7), 4)[..., 0]
    assert px[0, 0] == 0 and px[1, 1] == 0 and px[2, 2] == 3  # (2,2) -> centre (4,4)
    assert px[8, 6] == 5 and px[5, 1] == 2
    with pytest.raises(seg.SegmentationError, match="divide or be a multiple"):
        seg.check_stride(3, 4)
    assert seg.check_stride(0, 8) == 8 and seg.check_stride(16, 8) == 16


def _tiny_classifier(size=16, seed=4):
    from ish_tf.families import ModelConfig, build_model
    from ish_tf.families.ish_cnn.config import IshCnnConfig

    return build_model(ModelConfig(model="ish_cnn", input_size=size, seed=seed, family=IshCnnConfig(
        head_units=8, classes=("A", "B", "tissue", "background"), filters=(4, 8, 8))))


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_dense_and_sliding_prediction_agree(stride):
    model = _tiny_classifier()
    image = np.random.default_rng(0).integers(0, 256, (29, 35)).astype(np.uint8)
    dense, t1 = seg.dense_probabilities(model, image, stride, "dense")
    slide, t2 = seg.dense_probabilities(model, image, stride, "sliding", batch_size=50)
    assert t1 == t2 == stride and dense.shape == (29, 35, 4)
    np.testing.assert_allclose(dense, slide, atol=1e-5)
    # Tiling does not change the result.
    np.testing.assert_allclose(seg.dense_grid(model, image, stride, tile=2),
                               seg.sliding_grid(model, image, stride), atol=1e-5)


def test_run_segmentation_end_to_end(tmp_path):
    """bin/predict on a synthetic section with two saved models: CSV, maps and report."""
    from ish_tf.families import ModelConfig
    from ish_tf.families.ish_cnn.synthetic_pairs import SpatialSynthConfig, generate_pair

    table = generate_pair(SpatialSynthConfig(out_dir=str(tmp_path / "sec"), height=80,
                                             width=96, n_animals=1, seed=2))
    dirs = []
    for size in (16, 24):
        run = tmp_path / f"p{size}"
        run.mkdir()
        model = _tiny_classifier(size)
        model.save(str(run / "model.keras"))
        cfg = ModelConfig(model="ish_cnn", input_size=size, family=IshCnnConfig(
            classes=("Sst", "Pvalb", "tissue", "background")))
        (run / "model_config.json").write_text(cfg.to_json())
        dirs.append(str(run))
    out = str(tmp_path / "pred")
    cfg = seg.SegmentationConfig(model_dirs=tuple(dirs), image=table["image"][0],
                                 spots=table["spots"][0], mask=table["mask"][0], out_dir=out,
                                 radius=4, stride=4)
    result = seg.run_segmentation(cfg)
    df = pd.read_csv(result["dice_csv"])
    assert df["model"].tolist() == ["p16", "p24", "ensemble", "baseline_majority",
                                    "baseline_random"]
    assert {"dice_Sst", "dice_Pvalb", "dice_tissue", "dice_background", "mean_dice"} <= set(df)
    for name in ("truth", "p16", "p24", "ensemble"):
        assert os.path.getsize(result["maps"][name]) > 0
    with open(result["report"], encoding="utf-8") as f:
        html = f.read()
    assert "Dice per class" in html and "data:image/png;base64" in html
    # Models with other classes cannot be ensembled.
    bad = tmp_path / "bad"
    bad.mkdir()
    _tiny_classifier(16).save(str(bad / "model.keras"))
    (bad / "model_config.json").write_text(ModelConfig(
        model="ish_cnn", input_size=16, family=IshCnnConfig(classes=("x", "y", "tissue",
                                                                     "background"))).to_json())
    with pytest.raises(seg.SegmentationError, match="differ"):
        seg.run_segmentation(seg.SegmentationConfig(
            model_dirs=(dirs[0], str(bad)), image=table["image"][0], spots=table["spots"][0],
            out_dir=out))
    with pytest.raises(seg.SegmentationError, match="no model.keras"):
        seg.load_classifier(str(tmp_path))

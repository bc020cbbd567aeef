"""Plate-aware assignment, well averaging and held-out evaluation of the fluorescence
families (ish_tf.families.fluorescence.evaluation), and the per-plate statistics (data)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ish_tf.families.fluorescence.evaluation import (
    accuracy,
    attach_truth,
    class_groups,
    evaluate_predictions,
    plate_assignment,
    wells,
)


def test_assignment_worked_example():
    """p = [[0.6, 0.4], [0.7, 0.3]], classes {0, 1} once each: argmax says 0, 0; the
    assignment costs -log(0.4) - log(0.7) = 1.27 < -log(0.6) - log(0.3) = 1.71."""
    probs = np.array([[0.6, 0.4], [0.7, 0.3]])
    assigned, chosen = plate_assignment(probs, ["e/1", "e/1"])
    assert assigned.tolist() == [1, 0] and chosen.tolist() == [-1, -1]
    assert probs.argmax(1).tolist() == [0, 0]


def test_assignment_picks_the_plates_group_and_stays_inside_it():
    rng = np.random.default_rng(0)
    groups = [np.array([0, 1, 2, 6]), np.array([3, 4, 5, 6])]  # class 6: a control on both
    truth = {"A/1": [0, 1, 2, 6], "A/2": [3, 4, 5, 6]}
    rows, labels, plates = [], [], []
    for plate, classes in truth.items():
        for c in classes:
            p = rng.uniform(0.5, 1.0, 7)
            p[c] += 1.5  # the right class is likely but argmax errs sometimes
            p[4] += 2.0 if c == 1 else 0.0  # the class-1 well looks like class 4 (other group)
            rows.append(p / p.sum())
            labels.append(c)
            plates.append(plate)
    probs = np.array(rows)
    assigned, chosen = plate_assignment(probs, plates, groups)
    assert chosen.tolist() == [0] * 4 + [1] * 4
    assert all(a in groups[g] for a, g in zip(assigned, chosen, strict=True))
    # One-to-one within each plate.
    assert sorted(assigned[:4]) == [0, 1, 2, 6] and sorted(assigned[4:]) == [3, 4, 5, 6]
    assert accuracy(assigned, labels) == 1.0 > accuracy(probs.argmax(1), labels)


def test_repeated_classes_are_offered_as_often_as_needed():
    probs = np.full((4, 2), 0.5)
    assigned, _ = plate_assignment(probs, ["p"] * 4)
    assert sorted(assigned.tolist()) == [0, 0, 1, 1]


def test_class_groups_from_training_plates():
    labels = np.array([0, 1, 2, 0, 1, 2, 3, 4, -1])
    plates = np.array(["a/1", "a/1", "a/1", "b/1", "b/1", "b/1", "a/2", "a/2", "a/2"])
    groups = class_groups(labels, plates)
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3, 4]]


def test_wells_average_sites_and_truth_joins_by_name():
    sites = pd.DataFrame({"image_id": [0, 1, 2], "experiment": ["E", "E", "E"],
                          "plate": ["1", "1", "1"], "well": ["B02", "B02", "B03"],
                          "label": [-1, -1, -1]})
    probs = np.array([[0.8, 0.2], [0.4, 0.6], [0.1, 0.9]], "float32")
    embs = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], "float32")
    table, p, e = wells(sites, probs, embs)
    assert table["well"].tolist() == ["B02", "B03"]
    np.testing.assert_allclose(p, [[0.6, 0.4], [0.1, 0.9]], rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-6)
    truth = pd.DataFrame({"experiment": ["E", "E"], "plate": [1, 1], "well": ["B02", "B03"],
                          "sirna": [7, 3]})
    labelled = attach_truth(table, truth, classes=("3", "7"))
    assert labelled["label"].tolist() == [1, 0]
    with pytest.raises(ValueError, match="not among the model's classes"):
        attach_truth(table, truth, classes=("3", "8"))


def test_evaluate_predictions_reports_chance_beside_each_figure():
    rng = np.random.default_rng(1)
    n_classes, experiments = 4, ("E1", "E2")
    rows = [(e, "1", f"W{c}", c) for e in experiments for c in range(n_classes)]
    table = pd.DataFrame(rows, columns=["experiment", "plate", "well", "label"])
    probs = np.full((len(rows), n_classes), 0.1)
    probs[np.arange(len(rows)), table["label"]] = 0.7
    centres = rng.normal(size=(n_classes, 5))
    embs = centres[table["label"]] + 0.01 * rng.normal(size=(len(rows), 5))
    r = evaluate_predictions(table, probs, embs, [np.arange(n_classes)])
    assert r["accuracy"] == 1.0 and r["plate_assignment_accuracy"] == 1.0
    assert r["chance"] == 0.25 and r["plate_assignment_chance"] == 0.25
    assert r["rank1_other_experiment"] == 1.0 and r["rank1_chance"] == pytest.approx(1 / 4)  # 1 of 4 wells of the other experiment


def test_plate_stats_from_records_and_from_a_table_agree(tmp_path):
    import tensorflow as tf

    from ish_tf.data import records, shards
    from ish_tf.data.inputs import InputSpec
    from ish_tf.data.pipeline import list_shards
    from ish_tf.families.fluorescence.data import compute_plate_stats, stats_from_table
    from ish_tf.families.testing import tiny_records

    spec = InputSpec.image(6, 8, 8)
    out = tiny_records(str(tmp_path / "r"), spec, identities=2, groups=2, per_group=2)
    stats = compute_plate_stats(out, "experiment")
    pixels: dict[str, list] = {}
    for split in ("train", "test"):
        for f in list_shards(out, split):
            for raw in tf.data.TFRecordDataset(f, compression_type=shards.compression_of(f) or ""):
                feats = records.parse_example(raw)
                image = records.decode_image(feats, spec=spec).numpy().astype(float)
                pixels.setdefault(feats["donor_id"].numpy().decode(), []).append(image)
    assert stats.keys == tuple(sorted(pixels))
    for i, key in enumerate(stats.keys):
        stacked = np.stack(pixels[key]).reshape(-1, 6)
        np.testing.assert_allclose(stats.mean[i], stacked.mean(0), rtol=1e-5)
        np.testing.assert_allclose(stats.std[i], stacked.std(0), rtol=1e-4)
    # The same numbers from an (experiment, plate, channel) table, pooled per experiment.
    rows = [{"experiment": k, "plate": p, "channel": c + 1, "mean": float(x[..., c].mean()),
             "std": float(x[..., c].std()), "n_pixels": x[..., c].size}
            for k, images in pixels.items()
            for p, x in enumerate(np.array_split(np.stack(images), 2), start=1)
            for c in range(6)]
    pooled = stats_from_table(pd.DataFrame(rows), "experiment")
    np.testing.assert_allclose(pooled.mean, stats.mean, rtol=1e-5)
    np.testing.assert_allclose(pooled.std, stats.std, rtol=1e-4)
    assert stats_from_table(pd.DataFrame(rows), "plate").keys[:2] == (
        f"{stats.keys[0]}/1", f"{stats.keys[0]}/2")

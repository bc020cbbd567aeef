"""`bin/train --model=unet`: the U-Net segmenter task under the shared trainer (ish_tf.families.unet.task)."""

from __future__ import annotations

import os

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from ish_tf import cli
from ish_tf.data import manifest as mf
from ish_tf.families import ModelConfig, family_names, make_task
from ish_tf.families.unet import task as U
from ish_tf.families.unet.config import UnetConfig
from ish_tf.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """12 synthetic 128x160 sections with their true masks (masks/ beside manifest.csv)."""
    from ish_tf.data.synthetic import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("synth_unet")
    df = generate_dataset(SynthConfig(out_dir=str(out), n_genes=6, n_donors=3, donors_per_gene=2,
                                      images_per_gene_donor=1, height=128, width=160, seed=3))
    return out, df.sort_values("image_id").reset_index(drop=True)


def _arrays(n=5, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = (rng.random((n, size, size, 1)) > 0.5).astype(np.uint8)
    return images, masks


def _take(ds, n):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(n)]


# --------------------------------------------------------------------------- data
def test_batches_are_a_function_of_step_and_keep_image_and_mask_aligned():
    images, masks = _arrays()
    # The mask is a function of the image, so any misalignment of the augmentation shows.
    masks = (images[..., :1] > 127).astype(np.uint8)
    full = _take(U.pair_batches(images, masks, 4, seed=3), 6)
    resumed = _take(U.pair_batches(images, masks, 4, seed=3, start_step=4), 2)
    for (xa, ya), (xb, yb) in zip(full[4:], resumed, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    seen = []
    for x, y in full:
        assert x.shape == (4, 16, 16, 3) and x.dtype == np.float32 and y.shape == (4, 16, 16, 1)
        np.testing.assert_array_equal(y, (x[..., :1] > 127).astype(np.float32))
        for img in x:
            # Each example is one of the 8 flips/rotations of a source image.
            match = [k for k in range(5) for t in range(8)
                     if np.array_equal(img, _dihedral(images[k].astype(np.float32), t))]
            assert match, "augmented image is not a flip/rotation of an input"
            seen.append(match[0])
    # 24 examples from 5 images: every epoch is a permutation, so each image shows up.
    assert sorted(set(seen)) == [0, 1, 2, 3, 4]
    assert [sorted(seen[i:i + 5]) for i in range(0, 20, 5)] == [[0, 1, 2, 3, 4]] * 4
    other = _take(U.pair_batches(images, masks, 4, seed=4), 1)
    assert not np.array_equal(other[0][0], full[0][0])


def _dihedral(img, t):
    out = np.rot90(img, t % 4)
    return out[:, ::-1] if t >= 4 else out


@pytest.mark.parametrize("pipelines", [1, 2])
def test_replica_batches_concatenate_to_the_global_batch(pipelines):
    images, masks = _arrays(n=7)
    replicas = 4
    global_batches = _take(U.pair_batches(images, masks, 8, seed=1, start_step=2), 3)
    per_replica: list[list[np.ndarray]] = [[] for _ in range(3)]
    for pid in range(pipelines):
        ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pid,
                                         num_replicas_in_sync=replicas)
        per_pipe = replicas // pipelines
        got = _take(U.pair_batches(images, masks, 8, seed=1, input_context=ctx, start_step=2),
                    3 * per_pipe)
        for j, (x, _) in enumerate(got):
            assert x.shape[0] == 2
            per_replica[j // per_pipe].append(x)
    for step in range(3):
        np.testing.assert_array_equal(np.concatenate(per_replica[step]), global_batches[step][0])
    with pytest.raises(ValueError, match="divisible"):
        U.pair_batches(images, masks, 6, input_context=tf.distribute.InputContext(1, 0, 4))
    with pytest.raises(ValueError, match="no .image, mask. pairs"):
        U.pair_batches(images[:0], masks[:0], 4)


def test_split_pairs_is_seeded_and_order_independent():
    pairs = pd.DataFrame({"image_id": np.arange(100, 140), "image_path": "", "mask_path": ""})
    a = U.split_pairs(pairs, 0.1, seed=0)
    assert (a["split"] == "validation").sum() == 4
    shuffled = U.split_pairs(pairs.sample(frac=1.0, random_state=1), 0.1, seed=0)
    assert (set(shuffled.loc[shuffled["split"] == "validation", "image_id"])
            == set(a.loc[a["split"] == "validation", "image_id"]))
    assert set(U.split_pairs(pairs, 0.1, seed=1)["split"]) == {"train", "validation"}
    assert (U.split_pairs(pairs.iloc[:3], 0.01, seed=0)["split"] == "validation").sum() == 1
    assert (U.split_pairs(pairs, 0.0, seed=0)["split"] == "train").all()
    with pytest.raises(ValueError, match="--unet_val_fraction"):
        U.split_pairs(pairs, 1.0, seed=0)


def test_loss_terms_equal_bce_dice_loss_and_iou():
    from ish_tf.families.unet.model import bce_dice_loss

    rng = np.random.default_rng(0)
    y = (rng.random((3, 8, 8, 1)) > 0.4).astype(np.float32)
    p = rng.uniform(0.01, 0.99, (3, 8, 8, 1)).astype(np.float32)
    bce, dice = U.per_image_terms(y, p)
    want = float(keras.ops.convert_to_numpy(bce_dice_loss(y, p)))
    assert float(tf.reduce_mean(bce) + 1.0 - tf.reduce_mean(dice)) == pytest.approx(want, rel=1e-5)
    assert U.mask_iou(np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)) == pytest.approx(1 / 3)
    assert U.mask_iou(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    with pytest.raises(ValueError, match="shapes"):
        U.mask_iou(np.zeros(3, bool), np.zeros(4, bool))


def test_task_options_are_checked_and_registered():
    assert "unet" in family_names()
    cfg = TrainConfig(run_dir="unused")
    task = make_task(ModelConfig(model="unet", input_size=32, family=UnetConfig(batch_size=6)),
                     cfg)
    assert isinstance(task, U.UNetTask) and task.global_batch_size == 6
    with pytest.raises(ValueError, match="divisible"):
        make_task(ModelConfig(model="unet", input_size=40, family=UnetConfig(depth=4)), cfg)
    with pytest.raises(ValueError, match="--unet_batch_size"):
        make_task(ModelConfig(model="unet", input_size=32, family=UnetConfig(batch_size=0)), cfg)
    with pytest.raises(ValueError, match="--unet_mask_manifest"):
        task.make_dataset(None)


def test_unreadable_masks_are_skipped_and_recorded(synth, tmp_path):
    out, df = synth
    mask_dir = tmp_path / "masks"
    mask_dir.mkdir()
    for i in df["image_id"][:5]:
        (mask_dir / f"{i}.png").write_bytes((out / "masks" / f"{i}.png").read_bytes())
    (mask_dir / f"{df['image_id'][5]}.png").write_bytes(b"not a png")
    opts = {"mask_manifest": str(out / "manifest.csv"), "mask_dir": str(mask_dir),
            "val_fraction": 0.0, "batch_size": 2}
    run = tmp_path / "run"
    task = make_task(ModelConfig(model="unet", input_size=32, family=UnetConfig(**opts)),
                     TrainConfig(run_dir=str(run)))
    x, y = next(iter(task.make_dataset(None)))
    assert x.shape == (2, 32, 32, 3) and y.shape == (2, 32, 32, 1)
    split = pd.read_csv(run / U.SPLIT_NAME)
    assert (split["split"] == "train").sum() == 5 and (split["split"] == "skipped").sum() == len(df) - 5
    bad = split[split["image_id"] == df["image_id"][5]].iloc[0]
    assert bad["split"] == "skipped" and str(df["image_id"][5]) in bad["reason"]

    empty = tmp_path / "empty_masks"
    empty.mkdir()
    task = make_task(ModelConfig(model="unet", input_size=32,
                                 family=UnetConfig(**{**opts, "mask_dir": str(empty)})),
                     TrainConfig(run_dir=str(run)))
    with pytest.raises(ValueError, match="none of the 12 training pairs"):
        task.make_dataset(None)


# --------------------------------------------------------------------------- end to end
def _run_cli(argv):
    return cli.invoke("train", argv)


def test_bin_train_unet_then_segment_and_extract(synth, tmp_path, capsys):
    from ish_tf.data import patches as P
    from ish_tf.data import segment as S
    from ish_tf.families import load_model_config

    out, df = synth
    # Train on 8 sections, hold out 4 (a manifest of the training rows beside masks/).
    train_manifest = str(out / "manifest_train.csv")
    mf.write_manifest(df.iloc[:8], train_manifest)
    held = [(mf.image_path(train_manifest, p), str(out / "masks" / f"{i}.png"))
            for p, i in zip(df["path"][8:], df["image_id"][8:], strict=True)]
    run_dir = str(tmp_path / "run")
    argv = [f"--flagfile={os.path.join(ROOT, 'configs', 'unet_segmenter.cfg')}",
            f"--unet_mask_manifest={train_manifest}", f"--run_dir={run_dir}", "--input_size=64",
            "--unet_filters=8", "--unet_depth=2", "--unet_batch_size=4",
            "--unet_val_fraction=0.25",
            "--steps=40", "--decay_start=40", "--learning_rate=3e-3", "--log_every=10",
            "--checkpoint_every=20", "--strategy=default"]
    assert _run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert "steps 0->40" in printed and "model.keras" in printed
    for name in ("model.keras", "model_config.json", "flags.cfg", "metrics.csv", U.SPLIT_NAME):
        assert os.path.exists(os.path.join(run_dir, name)), name
    cfg = load_model_config(os.path.join(run_dir, "model_config.json"))
    assert cfg.model == "unet" and cfg.family.depth == 2 and cfg.input_size == 64
    metrics = pd.read_csv(os.path.join(run_dir, "metrics.csv"))
    assert list(metrics["step"]) == [10, 20, 30, 40]
    assert metrics["loss"].iloc[-1] < metrics["loss"].iloc[0]
    split = pd.read_csv(os.path.join(run_dir, U.SPLIT_NAME))
    assert list(split["split"]).count("validation") == 2 and list(split["split"]).count("train") == 6
    # TensorBoard got the step-0 images, predicted masks included.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run_dir, "logs", "train")).Reload()
    tags = events.Tags()
    assert "unet_predicted_masks" in tags["tensors"] + tags.get("images", [])
    assert "train/iou" in tags["tensors"] + tags.get("scalars", [])

    # The model works as bin/extract's segmenter: IoU on unseen sections well above
    # the trivial "all tissue" predictor (whose IoU is the tissue fraction).
    unet = S.UNetSegmenter.load(os.path.join(run_dir, "model.keras"))
    scores = U.score_segmenter(unet, held)
    trivial = scores["truth_fraction"].mean()
    assert scores["iou"].mean() > trivial + 0.06, (scores, trivial)
    assert scores["iou"].min() > 0.7, scores

    # Rerunning resumes: nothing left to do at --steps.
    assert _run_cli(argv) == 0
    assert "already reached step 40" in capsys.readouterr().out

    summary = P.run_extract(P.ExtractConfig(
        manifest=str(out / "manifest.csv"), out_dir=str(tmp_path / "records"),
        patches_per_image=2, source_size=48, patch_size=16, min_fraction=0.9, max_tries=50,
        num_shards=1, seed=0,
        mask=S.MaskConfig(segmenter="unet", unet_path=os.path.join(run_dir, "model.keras"))))
    total = sum(s["patches"] for s in summary["splits"].values())
    assert total > 0, summary
    with Image.open(held[0][1]) as im:
        assert im.size == (160, 128)

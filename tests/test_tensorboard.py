"""TensorBoard output read back: training scalars and images, HParams, embedding projector."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")

from ish_tf.data.embeddings import EmbeddingTable  # noqa: E402
from ish_tf.families import ModelConfig, make_task  # noqa: E402
from ish_tf.families.triplet.config import TripletConfig  # noqa: E402
from ish_tf.train import TrainConfig  # noqa: E402
from ish_tf.train import tensorboard as tb  # noqa: E402
from ish_tf.train.trainer import run_paths, train  # noqa: E402

R, P, K = 16, 3, 2


def _batches(n=4, classes=6, seed=0):
    rng = np.random.default_rng(seed)
    xs = rng.uniform(0, 255, (n, P * K, R, R, 3)).astype("float32")
    ys = np.stack([np.repeat(rng.choice(classes, P, replace=False), K) for _ in range(n)])
    return xs, ys.astype("int32")


def test_training_run_logs_scalars_per_step_and_input_images(tmp_path):
    xs, ys = _batches()
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), steps=3, decay_start=2,
                      learning_rate=1e-3, log_every=1, checkpoint_every=3, strategy="default")
    model_cfg = ModelConfig("triplet", input_size=R, seed=0, family=TripletConfig(
        backbone="small_cnn", backbone_weights="none", head_units=8, embedding_dim=4, P=P, K=K))
    task = make_task(model_cfg, cfg, lambda ctx: tf.data.Dataset.from_tensor_slices((xs, ys)).repeat())
    train(task, cfg)
    tags = tb.event_tags(os.path.join(run_paths(cfg.run_dir)["logs"], "train"))
    for tag in ("loss", "lr", "active_fraction", "mean_d_pos", "mean_d_neg", "top1",
                "embedding_norm", "grad_norm", "images_per_sec"):
        assert tags.get(tag) == 3, (tag, tags)  # one value per step at --log_every=1
    # The patches as fed (flipped): at step 0 and at the last step's checkpoint.
    assert tags.get("input_patches") == 2


def test_hparams_config_and_session_read_back(tmp_path):
    from tensorboard.plugins.hparams import metadata

    logdir = str(tmp_path / "runs")
    tb.write_hparams_config(logdir, {"P": [5, 10], "margin": ["soft", "0.5"], "flips": [True, False],
                                     "learning_rate": [1e-4, 7e-5]}, ["val_rank1"])
    tb.write_hparams_session(os.path.join(logdir, "trial_0"),
                             {"P": 10, "margin": "soft", "flips": False, "learning_rate": 7e-5},
                             {"val_rank1": 0.25, "seconds": float("nan")}, trial_id="trial_0")
    tags = tb.event_tags(logdir)
    assert tags["_hparams_/experiment"] == 1 and tags["_hparams_/session_start_info"] == 1
    assert tags["val_rank1"] == 1 and "seconds" not in tags  # non-finite metrics skipped
    session = None
    for root, _, files in os.walk(os.path.join(logdir, "trial_0")):
        for name in files:
            for event in tf.compat.v1.train.summary_iterator(os.path.join(root, name)):
                for value in event.summary.value:
                    if value.tag == "_hparams_/session_start_info":
                        session = metadata.parse_session_start_info_plugin_data(
                            value.metadata.plugin_data.content)
    assert session is not None
    got = {k: v.WhichOneof("kind") for k, v in session.hparams.items()}
    assert got == {"P": "number_value", "margin": "string_value", "flips": "bool_value",
                   "learning_rate": "number_value"}
    assert session.hparams["P"].number_value == 10 and session.hparams["margin"].string_value == "soft"


def test_projector_writes_checkpoint_metadata_and_config(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(30, 4)).astype("float32")
    genes = [f"Gene{i}" for i in range(30)]
    groups = ["a\tb" if i == 0 else f"g{i % 3}" for i in range(30)]
    logdir = str(tmp_path / "proj")
    n = tb.write_projector(logdir, values, {"gene_symbol": genes, "group": groups}, max_points=20)
    assert n == 20
    lines = open(os.path.join(logdir, tb.METADATA_NAME)).read().splitlines()
    assert lines[0] == "gene_symbol\tgroup" and len(lines) == 21
    assert all(len(line.split("\t")) == 2 for line in lines)  # tabs in labels are escaped
    config = open(os.path.join(logdir, "projector_config.pbtxt")).read()
    assert "metadata.tsv" in config and "embedding/.ATTRIBUTES/VARIABLE_VALUE" in config
    reader = tf.train.load_checkpoint(logdir)
    stored = reader.get_tensor("embedding/.ATTRIBUTES/VARIABLE_VALUE")
    # The stored rows are the sampled ones, in the order of the metadata lines.
    rows = [genes.index(line.split("\t")[0]) for line in lines[1:]]
    np.testing.assert_array_equal(stored, values[rows])
    with pytest.raises(ValueError, match="group"):
        tb.write_projector(logdir, values, {"group": groups[:5]})


def test_projector_from_gene_level_table(tmp_path):
    keys = pd.DataFrame({"gene_symbol": ["Gad1", "Sst", "Vip"], "entrez_id": [1, 2, 3]})
    table = EmbeddingTable(keys, np.eye(3, dtype="float32"))
    logdir = str(tmp_path / "proj")
    assert tb.write_projector_from_table(logdir, table) == 3
    # One label column: no header line (the projector's convention).
    assert open(os.path.join(logdir, tb.METADATA_NAME)).read().split() == ["Gad1", "Sst", "Vip"]
    with pytest.raises(ValueError, match="label columns"):
        tb.write_projector_from_table(logdir, table, ("go_term",))

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
    # Grouped so TensorBoard shows the loss first: loss/, then train/ (then validation/).
    for tag in ("loss/train", "train/lr", "train/active_fraction", "train/mean_d_pos",
                "train/mean_d_neg", "train/top1", "train/embedding_norm", "train/grad_norm",
                "train/images_per_sec"):
        assert tags.get(tag) == 3, (tag, tags)  # one value per step at --log_every=1
    scalars = [t for t in tags if t != "input_patches"]
    assert all(t.startswith(("loss/", "train/")) for t in scalars), scalars
    # In-memory batches have no validation split: no validation scalars.
    assert not any(t.startswith("validation/") for t in tags)
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


def test_projector_is_found_from_the_run_logdir(tmp_path):
    """The projector under RUN/logs/projector is listed by TensorBoard's projector plugin
    opened on RUN/logs (the --logdir bin/train prints), next to the training run."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector import projector_plugin

    logs = str(tmp_path / "logs")
    with tf.summary.create_file_writer(os.path.join(logs, "train")).as_default():
        tf.summary.scalar("loss/train", 1.0, step=1)
    tb.write_projector(os.path.join(logs, "projector"), np.eye(3, dtype="float32"),
                       {"gene_symbol": ["Gad1", "Sst", "Vip"]})
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logs)
    multiplexer.Reload()
    plugin = projector_plugin.ProjectorPlugin(base_plugin.TBContext(
        logdir=logs, data_provider=data_provider.MultiplexerDataProvider(multiplexer, logs)))
    plugin._update_configs()
    assert list(plugin._configs) == ["projector"]


# --------------------------------------------------------------------------- validation
def _records_with_validation(out_dir, size=16):
    """train: 6 genes x 4 images; validation: 4 genes x 2 donors x 2 images x 2 patches."""
    from ish_tf.data import records, shards

    rng = np.random.default_rng(0)
    train_genes = [f"T{i}" for i in range(6)]
    val_genes = [f"V{i}" for i in range(4)]
    vocab = shards.make_gene_vocabulary(train_genes + val_genes)
    index = {g.gene_symbol: g.gene_index for g in vocab}
    donors = ["d0", "d1"]
    image_id = 0
    for split, genes, per_donor, patches in (("train", train_genes, 2, 1),
                                              ("validation", val_genes, 2, 2)):
        with shards.ShardWriter(str(out_dir), split, 0, 1) as writer:
            for g in genes:
                base = rng.integers(0, 256, (size, size, 3))
                for donor in donors:
                    for _ in range(per_donor):
                        for p in range(patches):
                            img = np.clip(base + rng.normal(0, 30, base.shape), 0,
                                          255).astype(np.uint8)
                            writer.write(records.make_example(
                                encoded=tf.io.encode_png(img).numpy(), height=size, width=size,
                                image_id=image_id, patch_index=p, gene_symbol=g,
                                gene_index=index[g], donor_id=donor,
                                donor_index=donors.index(donor)), g, image_id)
                        image_id += 1
        shards.update_index(str(out_dir), writer.info)
    shards.write_dataset_info(str(out_dir), shards.DatasetInfo(
        genes=vocab, donors=donors, patch_size=size, format="png"))
    return str(out_dir)


@pytest.fixture(scope="module")
def validated_runs(tmp_path_factory):
    """Two 4-step triplet runs on the same records: validation every 2 steps, and none."""
    root = tmp_path_factory.mktemp("validation")
    records_dir = _records_with_validation(root / "records")
    model_cfg = ModelConfig("triplet", input_size=R, seed=0, family=TripletConfig(
        backbone="small_cnn", backbone_weights="none", head_units=8, embedding_dim=4, P=P, K=K))
    runs = {}
    for name, every in (("validated", 2), ("plain", 0)):
        cfg = TrainConfig(run_dir=str(root / name), records_dir=records_dir, steps=4,
                          decay_start=4, learning_rate=1e-3, log_every=1, checkpoint_every=4,
                          validate_every=every, image_summaries=False, strategy="default",
                          deterministic=True)
        train(make_task(model_cfg, cfg), cfg)
        runs[name] = cfg
    return runs


def test_triplet_validation_scores_reach_tensorboard_and_csv(validated_runs):
    run = validated_runs["validated"]
    tags = tb.event_tags(os.path.join(run_paths(run.run_dir)["logs"], "train"))
    for tag in ("validation/rank1_other_donor", "validation/map_other_donor",
                "validation/chance_rank1_other_donor"):
        assert tags.get(tag) == 2, (tag, tags)  # steps 2 and 4
    table = pd.read_csv(run_paths(run.run_dir)["validation"])
    assert list(table["step"]) == [2, 4]
    # 16 validation images (patches averaged per image), 4 genes x 2 donors x 2 images:
    # each image has 2 other-donor positives among 8 other-donor candidates.
    assert table["chance_rank1_other_donor"].iloc[0] == pytest.approx(2 / 8)
    assert table["rank1_other_donor"].between(0, 1).all()
    assert table["map_other_donor"].between(0, 1).all()
    plain = tb.event_tags(os.path.join(run_paths(validated_runs["plain"].run_dir)["logs"],
                                       "train"))
    assert not any(t.startswith("validation/") for t in plain)


def test_validation_does_not_change_training(validated_runs):
    """Validation is inference only: the training losses are the same with and without."""
    losses = {name: pd.read_csv(run_paths(cfg.run_dir)["metrics"])["loss"].to_numpy()
              for name, cfg in validated_runs.items()}
    assert len(losses["plain"]) == 4
    np.testing.assert_array_equal(losses["validated"], losses["plain"])

"""--strategy=multi_worker: two worker processes on 127.0.0.1 train the same model."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from cluster import run_workers

tf = pytest.importorskip("tensorflow")

from ish_tf.train import strategy as strategy_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 16

WORKER = r"""
import sys
import numpy as np
from ish_tf.families import ModelConfig, make_task
from ish_tf.families.triplet.config import TripletConfig
from ish_tf.train import TrainConfig, trainer

out_npz, records_dir, run_dir = sys.argv[1:4]
real_save = trainer.save_keras_model

def capture(model, path):
    # Every worker saves the final model (the chief into RUN): record its weights.
    np.savez(out_npz, *model.get_weights())
    real_save(model, path)

trainer.save_keras_model = capture
cfg = TrainConfig(run_dir=run_dir, records_dir=records_dir, steps=3, decay_start=2,
                  learning_rate=1e-2, log_every=1, checkpoint_every=2, strategy="multi_worker",
                  image_summaries=False, seed=0)
# Synchronised batch norm: the moving statistics are then global too, so every weight
# (not only the trainable ones) must agree across the workers.
model_cfg = ModelConfig("triplet", input_size=16, seed=0, family=TripletConfig(
    backbone="small_cnn", backbone_weights="none", head_units=16, embedding_dim=8,
    head_batch_norm="sync", P=2, K=2))
result = trainer.train(make_task(model_cfg, cfg), cfg)
print("RESULT", result.step, repr(result.loss), flush=True)
"""


def _write_records(out_dir: str) -> str:
    from ish_tf.data import records, shards

    rng = np.random.default_rng(0)
    symbols = [f"G{i}" for i in range(6)]
    vocab = shards.make_gene_vocabulary(symbols)
    with shards.ShardWriter(out_dir, "train", 0, 1) as writer:
        for i, g in enumerate(symbols):
            for j in range(4):
                png = tf.io.encode_png(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).numpy()
                writer.write(records.make_example(image_encoded=png, image_height=S,
                                                  image_width=S, image_id=10 * i + j,
                                                  gene_symbol=g, gene_index=i), g, 10 * i + j)
    shards.update_index(out_dir, writer.info)
    shards.write_dataset_info(out_dir, shards.DatasetInfo(genes=vocab, patch_size=S,
                                                            format="png"))
    return out_dir


def test_tf_config_and_chief(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert strategy_lib.tf_config() == {} and strategy_lib.is_chief()
    with pytest.raises(ValueError, match="TF_CONFIG"):
        strategy_lib.make_strategy("multi_worker")
    cluster = {"worker": ["a:1", "b:2"]}
    assert strategy_lib.is_chief({"cluster": cluster, "task": {"type": "worker", "index": 0}})
    assert not strategy_lib.is_chief({"cluster": cluster, "task": {"type": "worker", "index": 1}})
    with_chief = {"chief": ["c:3"], **cluster}
    assert not strategy_lib.is_chief({"cluster": with_chief, "task": {"type": "worker", "index": 0}})
    assert strategy_lib.is_chief({"cluster": with_chief, "task": {"type": "chief", "index": 0}})
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="JSON"):
        strategy_lib.tf_config()


def test_two_workers_train_to_identical_weights(tmp_path):
    records_dir = _write_records(str(tmp_path / "records"))
    run_dir = str(tmp_path / "run")
    outputs = run_workers(WORKER, lambda i: [str(tmp_path / f"w{i}.npz"), records_dir, run_dir],
                          cwd=ROOT)
    results = [[line for line in out.splitlines() if line.startswith("RESULT")][-1]
               for out in outputs]
    assert results[0] == results[1] and results[0].startswith("RESULT 3 ")
    w0, w1 = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert len(w0.files) == len(w1.files) > 0
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key])
    # Only the chief (worker 0) wrote the run; the other worker's scratch is gone.
    steps = sorted(int(p.split("-")[-1].split(".")[0])
                   for p in glob.glob(os.path.join(run_dir, "checkpoints", "ckpt-*.index")))
    assert steps == [2, 3]
    for name in ("model.keras", "metrics.csv", "train_config.json"):
        assert os.path.exists(os.path.join(run_dir, name)), name
    assert not glob.glob(os.path.join(run_dir, ".workertemp_*"))
    import keras

    chief_model = keras.saving.load_model(os.path.join(run_dir, "model.keras"))
    for got, want in zip(chief_model.get_weights(), (w0[k] for k in w0.files), strict=True):
        np.testing.assert_array_equal(got, want)

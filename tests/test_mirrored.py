"""MirroredStrategy over two logical CPUs gives the single-device step exactly.

For the triplet model (loss, gradients, trainer runs, batch-hard mining across replicas),
and for the CDAE and the ISH CNN through the same trainer.

The check runs in a subprocess (this file's `__main__` block) because the two logical
CPU devices must be configured before TensorFlow initialises, which the rest of the
test session has long done. The subprocess prints one JSON line of measured
differences; the test asserts on them, so a failure shows the numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TOL = 1e-5


def _run_check() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"mirrored check failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def mirrored_result() -> dict:
    return _run_check()


def test_two_replicas_really_used(mirrored_result):
    assert mirrored_result["replicas"] == 2
    assert mirrored_result["per_replica_batch"] == mirrored_result["global_batch"] // 2


def test_gathered_loss_and_gradients_match_single_device(mirrored_result):
    r = mirrored_result
    assert r["loss_diff"] < TOL, r
    assert r["grad_max_abs_diff"] < TOL, r
    assert r["stats_max_abs_diff"] < TOL, r
    # The gradients are not trivially zero (so equality means something).
    assert r["grad_max_abs"] > 1e-3, r


def test_synchronized_batch_norm_head_matches_single_device(mirrored_result):
    r = mirrored_result
    assert r["sync_bn_loss_diff"] < TOL, r
    assert r["sync_bn_grad_max_abs_diff"] < TOL, r


def test_without_gathering_batch_hard_differs(mirrored_result):
    r = mirrored_result
    # Per-replica mining sees only half the genes: a different loss and gradient.
    assert r["nogather_loss_diff"] > 1e-4, r
    assert r["nogather_grad_max_abs_diff"] > 1e-3, r


def test_trainer_steps_under_mirrored_match_single_device(mirrored_result):
    r = mirrored_result
    assert r["trained_steps"] == 3
    assert r["train_weights_max_abs_diff"] < TOL, r
    assert r["train_loss_diff"] < TOL, r


def test_cdae_trains_under_mirrored_as_on_one_device(mirrored_result):
    r = mirrored_result
    assert r["cdae_steps"] == 3 and r["cdae_reconstruction_event_files"] >= 1, r
    assert r["cdae_loss_diff"] < TOL and r["cdae_weights_max_abs_diff"] < TOL, r
    # It trained (Adam with epsilon 1 moves weights by about the gradient): equality means
    # something.
    assert r["cdae_weights_moved"] > 1e-4, r


def test_cdae_batch_norm_statistics_reestimated_under_mirrored(mirrored_result):
    r = mirrored_result
    assert r["cdae_bn_layers"] == 4, r  # two encoder and two decoder convolutions
    assert r["cdae_bn_stats_max_abs_diff"] < 1e-4, r


def test_ish_cnn_trains_under_mirrored_as_on_one_device(mirrored_result):
    r = mirrored_result
    assert r["ish_cnn_loss_diff"] < TOL and r["ish_cnn_weights_max_abs_diff"] < TOL, r
    assert r["ish_cnn_weights_moved"] > 1e-4, r


def test_logged_gradient_norm_is_the_global_gradients(mirrored_result):
    # The gradient norm written to metrics.csv and TensorBoard is the norm of the
    # summed (global-batch) gradient, not one replica's share scaled up.
    r = mirrored_result
    assert len(r["train_grad_norms"]) == 3 and min(r["train_grad_norms"]) > 1e-3, r
    assert r["train_grad_norm_max_rel_diff"] < TOL, r


def _main() -> None:  # pragma: no cover - runs in the subprocess
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

    import dataclasses
    import tempfile

    import keras
    import numpy as np
    import pandas as pd

    from ish_tf.families import ModelConfig, make_task
    from ish_tf.families.cdae.config import CdaeConfig
    from ish_tf.families.ish_cnn.config import IshCnnConfig
    from ish_tf.families.triplet.config import TripletConfig
    from ish_tf.families.triplet.task import TripletTask
    from ish_tf.losses.triplet import triplet_loss
    from ish_tf.train import TrainConfig
    from ish_tf.train.trainer import replica_gradients, train

    P, K, R = 4, 3, 16
    rng = np.random.default_rng(0)
    # Genes in blocks of K: replica 0 sees genes 0-1, replica 1 genes 2-3.
    images = rng.uniform(0, 255, (P * K, R, R, 3)).astype("float32")
    labels = np.repeat(np.arange(P), K).astype("int32")
    half = P * K // 2
    # No per-replica batch statistics: small_cnn has no BN, the head's BN is off.
    mcfg = ModelConfig("triplet", input_size=R, seed=3, family=TripletConfig(
        backbone="small_cnn", backbone_weights="none", head_units=32, embedding_dim=8,
        head_batch_norm="none", P=P, K=K))
    tcfg = TrainConfig(learning_rate=1e-3, steps=3, decay_start=3, log_every=1,
                       checkpoint_every=2, image_summaries=False, seed=0)
    task = make_task(mcfg, tcfg)

    class NoGatherTask(TripletTask):
        """Mines each replica's slice alone: what the gather prevents."""

        def compute_loss(self, model, batch, training):
            x, y = batch
            loss, stats = triplet_loss(y, model(x, training=training))
            ctx = tf.distribute.get_replica_context()
            return ctx.all_reduce("MEAN", loss), stats

    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: (images[ctx.replica_id_in_sync_group * half:(ctx.replica_id_in_sync_group + 1) * half],
                     labels[ctx.replica_id_in_sync_group * half:(ctx.replica_id_in_sync_group + 1) * half]))

    def single_and_mirrored(t):
        """One step's (loss, stats, grads) of task t on one device and on two replicas."""
        single_model = t.build_model()
        single = replica_gradients(t, single_model, (images, labels), single_model.trainable_variables, 1)
        with strategy.scope():
            mirrored_model = t.build_model()
        mirrored_model.set_weights(single_model.get_weights())

        @tf.function
        def step(batch):
            loss, stats, grads = strategy.run(
                lambda b: replica_gradients(t, mirrored_model, b, mirrored_model.trainable_variables,
                                            strategy.num_replicas_in_sync), args=(batch,))
            grads = [strategy.reduce("SUM", g, axis=None) for g in grads]
            local = strategy.experimental_local_results
            return local(loss)[0], {k: local(v)[0] for k, v in stats.items()}, grads
        return single, step(per_replica)

    (loss1, stats1, grads1), (loss2, stats2, grads2) = single_and_mirrored(task)
    _, (loss3, _, grads3) = single_and_mirrored(NoGatherTask(mcfg, tcfg))
    # Synchronised batch norm in the head: statistics over the global batch.
    sync_cfg = dataclasses.replace(mcfg, family=dataclasses.replace(mcfg.family,
                                                                    head_batch_norm="sync"))
    (loss4, _, grads4), (loss5, _, grads5) = single_and_mirrored(make_task(sync_cfg, tcfg))
    local_batch = strategy.experimental_local_results(per_replica)[0][0]

    def max_diff(a, b):
        return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(a, b, strict=True))

    # The trainer itself, on the same batches both ways.
    def dataset_fn(ctx):
        ds = tf.data.Dataset.from_tensors((images, labels)).repeat()
        if ctx is not None:  # consecutive per-replica slices of each global batch
            ds = ds.unbatch().batch(ctx.get_per_replica_batch_size(P * K))
        return ds

    def single_and_mirrored_runs(model_config, data_fn):
        """3 steps (a checkpoint at 2) of the trainer on the same data, both ways:
        {"single"|"mirrored": (TrainResult, final weights, metrics.csv as a frame,
        {folder under logs/: its files})}."""
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, strat in (("single", tf.distribute.get_strategy()), ("mirrored", strategy)):
                # Adam with a large epsilon is close to SGD: float noise in near-zero
                # gradients cannot flip an update's sign, so weights compare to 1e-5,
                # while summing vs averaging replica gradients would differ by ~1e-2.
                cfg = dataclasses.replace(tcfg, run_dir=os.path.join(tmp, name),
                                          learning_rate=1.0, adam_epsilon=1.0)
                result = train(make_task(model_config, cfg, data_fn), cfg, strategy=strat)
                weights = keras.saving.load_model(result.model_path).get_weights()
                metrics = pd.read_csv(os.path.join(cfg.run_dir, "metrics.csv"))
                logs = {d: os.listdir(os.path.join(cfg.run_dir, "logs", d))
                        for d in os.listdir(os.path.join(cfg.run_dir, "logs"))}
                out[name] = (result, weights, metrics, logs)
        return out

    def moved(model_config, runs):
        """How far training moved the weights (so that equal runs mean something)."""
        return max_diff(runs["single"][1], make_task(model_config, tcfg).build_model().get_weights())

    results = single_and_mirrored_runs(mcfg, dataset_fn)

    # The CDAE family through the same trainer: without input noise and batch statistics,
    # three steps on two replicas (each reconstructing half of every batch) give the
    # single-device run; reconstruction images are written from the replicas too.
    cdae_model = ModelConfig(model="cdae", input_size=16, seed=3, family=CdaeConfig(
        depth=2, filters=(4, 8), code_size=8, norm="none", noise="none", noise_level=0.0,
        loss="mse", batch_size=8, image_every=1))
    whole = rng.uniform(0, 255, (8, 16, 16, 1)).astype("float32")

    def cdae_data(ctx):
        parts = whole[None] if ctx is None else whole.reshape(ctx.num_replicas_in_sync, -1,
                                                              16, 16, 1)
        ds = tf.data.Dataset.from_tensor_slices(parts).repeat().enumerate()
        return ds.map(lambda k, x: {"images": x, "step": k // len(parts)})

    cdae = single_and_mirrored_runs(cdae_model, cdae_data)
    # With batch norm and masking noise, the final model's statistics are re-estimated on
    # the clean images under the strategy too (mirrored variables, cross-replica context).
    from ish_tf.models.batch_norm import batch_norm_moments

    bn_model = dataclasses.replace(cdae_model, family=dataclasses.replace(
        cdae_model.family, norm="batch", noise="masking", noise_level=0.5, bn_images=8,
        image_every=0))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dataclasses.replace(tcfg, run_dir=tmp)
        result = train(make_task(bn_model, cfg, cdae_data), cfg, strategy=strategy)
        final = keras.saving.load_model(result.model_path, compile=False)
    want, _ = batch_norm_moments(final, [whole])
    bn_stats_diff = max(
        float(np.max(np.abs(final.get_layer(name).moving_mean.numpy() - mean)
                     + np.abs(final.get_layer(name).moving_variance.numpy() - var)))
        for name, (mean, var) in want.items())
    # The ISH CNN likewise (softmax cross-entropy over the global P x K batch), on the
    # triplet check's batches, without dropout and batch statistics.
    ish_model = ModelConfig(model="ish_cnn", input_size=R, seed=3, family=IshCnnConfig(
        head_units=8, n_classes=P, filters=(4, 8), batch_norm=False, dropout=0.0, P=P, K=K))
    ish = single_and_mirrored_runs(ish_model, dataset_fn)

    print(json.dumps({
        "ish_cnn_loss_diff": abs(ish["single"][0].loss - ish["mirrored"][0].loss),
        "ish_cnn_weights_max_abs_diff": max_diff(ish["single"][1], ish["mirrored"][1]),
        "ish_cnn_weights_moved": moved(ish_model, ish),
        "cdae_steps": cdae["mirrored"][0].step,
        "cdae_loss_diff": abs(cdae["single"][0].loss - cdae["mirrored"][0].loss),
        "cdae_weights_max_abs_diff": max_diff(cdae["single"][1], cdae["mirrored"][1]),
        "cdae_weights_moved": moved(cdae_model, cdae),
        "cdae_reconstruction_event_files": len(cdae["mirrored"][3].get("reconstruction", [])),
        "cdae_bn_layers": len(want),
        "cdae_bn_stats_max_abs_diff": bn_stats_diff,
        "replicas": strategy.num_replicas_in_sync,
        "global_batch": P * K,
        "per_replica_batch": int(local_batch.shape[0]),
        "loss_diff": abs(float(loss1) - float(loss2)),
        "stats_max_abs_diff": max(abs(float(stats1[k]) - float(stats2[k])) for k in stats1),
        "grad_max_abs_diff": max_diff(grads1, grads2),
        "grad_max_abs": max(float(np.max(np.abs(g))) for g in grads1),
        "sync_bn_loss_diff": abs(float(loss4) - float(loss5)),
        "sync_bn_grad_max_abs_diff": max_diff(grads4, grads5),
        "nogather_loss_diff": abs(float(loss1) - float(loss3)),
        "nogather_grad_max_abs_diff": max_diff(grads1, grads3),
        "trained_steps": results["mirrored"][0].step,
        "train_loss_diff": abs(results["single"][0].loss - results["mirrored"][0].loss),
        "train_weights_max_abs_diff": max_diff(results["single"][1], results["mirrored"][1]),
        "train_grad_norms": [float(v) for v in results["single"][2]["grad_norm"]],
        "train_grad_norm_max_rel_diff": float(np.max(
            np.abs(results["single"][2]["grad_norm"] - results["mirrored"][2]["grad_norm"])
            / results["single"][2]["grad_norm"])),
    }))


if __name__ == "__main__":
    _main()

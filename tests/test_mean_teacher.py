"""The mean-teacher task (ish_tf.families.fluorescence.task) and its input pipeline.

In process, on one device: the ramps' values, the batch layout (labelled then
unlabelled sites, two views), plate-assignment pseudo-labels (recomputed, checkpointed,
resumed), and a 3-step run whose logged EMA decays follow the
ramp, whose teacher (weights and batch-norm moving statistics) moved away from both
its start and the student, and whose model.keras is the teacher (student.keras the
student). In a subprocess (this file's `__main__`, two logical CPUs): the same run
under MirroredStrategy ends with this process's single-device student, teacher and
pseudo-labels, and the teacher's copies agree on both replicas.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _setup(workdir):
    from ish_tf.families.fluorescence.testing import tiny_mean_teacher

    model_config, fields = tiny_mean_teacher(str(workdir), seed=0)
    # Decays 0.5 from step 0, 0.9 from step 1, 0.99 from step 2: three different updates.
    model_config.family.ema_decays = (0.5, 0.9, 0.99)
    model_config.family.ema_steps = (0, 1, 2)
    # The quickstart's pseudo-labels (the shared family harness trains the argmax ones):
    # the teacher's plate assignment, recomputed at steps 0 and 2.
    model_config.family.pseudo_labels = "plate_assignment"
    model_config.family.pseudo_label_every = 2
    model_config.family.pseudo_label_weight = 1.0
    return model_config, fields


def _train_config(run_dir, fields, image_summaries=False):
    from ish_tf.train import TrainConfig

    return TrainConfig(run_dir=str(run_dir), steps=3, decay_start=3, checkpoint_every=3,
                       log_every=1, image_summaries=image_summaries, learning_rate=1e-2, adam_epsilon=1.0,
                       seed=0, strategy="default", **fields)


def test_ramps():
    """EMA decay by step thresholds; consistency weight 100 exp(-5 (1 - t/T)^2):
    t = 0 -> 100 e^-5 = 0.674, t = T/2 -> 100 e^-1.25 = 28.65, t >= T -> 100."""
    from ish_tf.families.fluorescence.task import consistency_ramp, ramp_value

    steps, decays = (0, 10, 100, 1000), (0.5, 0.9, 0.99, 0.999)
    got = [float(ramp_value(s, steps, decays)) for s in (0, 9, 10, 99, 100, 5000)]
    np.testing.assert_allclose(got, [0.5, 0.5, 0.9, 0.9, 0.99, 0.999], rtol=1e-6)
    w = [float(consistency_ramp(t, 50, 100.0)) for t in (0, 25, 50, 80)]
    np.testing.assert_allclose(w, [100 * math.exp(-5), 100 * math.exp(-1.25), 100, 100],
                               rtol=1e-5)
    assert float(consistency_ramp(0, 0, 100.0)) == 100.0


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    from ish_tf.families import make_task
    from ish_tf.train.trainer import train

    workdir = tmp_path_factory.mktemp("mt")
    model_config, fields = _setup(workdir)
    cfg = _train_config(workdir / "run", fields, image_summaries=True)
    task = make_task(copy.deepcopy(model_config), cfg)
    initial = None

    import keras

    result = train(task, cfg)
    initial = make_task(copy.deepcopy(model_config), cfg).build_model().get_weights()
    return {"task": task, "result": result, "initial": initial, "cfg": cfg,
            "model_config": model_config, "keras": keras}


def test_batches_hold_labelled_then_unlabelled_sites_in_two_views(single_run):
    from ish_tf.families.fluorescence.testing import SIZE

    task = single_run["task"]
    family = task.model_config.family
    batch = next(iter(task.make_dataset(None, 0)))
    b, u = family.batch_size, family.unlabelled_batch_size
    assert batch["student"].shape == (b + u, SIZE, SIZE, 6) == batch["teacher"].shape
    labels = batch["label"].numpy()
    # Unlabelled sites carry their pseudo-label slot k as -2 - k, never their label.
    assert (labels[:b] >= 0).all() and (labels[b:] <= -2).all()
    # The views differ (augmentation and jitter) but show the same sites: one of the 8
    # flips/rotations of the teacher's view correlates ~1 with the student's, channel by
    # channel (the jitter is affine per channel).
    s, t = batch["student"].numpy(), batch["teacher"].numpy()
    assert np.abs(s - t).max() > 1e-2
    for a, b in zip(s, t, strict=True):
        best = max(min(np.corrcoef(a[..., c].ravel(), d[..., c].ravel())[0, 1] for c in range(6))
                   for d in (np.rot90(f, k) for f in (b, b[:, ::-1]) for k in range(4)))
        assert best > 0.999
    # Resuming at step 1 gives the second batch of the stream.
    second = list(task.make_dataset(None, 0).take(2))[1]
    np.testing.assert_array_equal(next(iter(task.make_dataset(None, 1)))["student"].numpy(),
                                  second["student"].numpy())


def test_logged_ema_decay_and_consistency_weight_follow_the_ramps(single_run):
    import pandas as pd

    metrics = pd.read_csv(os.path.join(single_run["cfg"].run_dir, "metrics.csv"))
    np.testing.assert_allclose(metrics["ema_decay"], [0.5, 0.9, 0.99], rtol=1e-6)
    rampup = single_run["model_config"].family.consistency_rampup  # 2
    want = [100 * math.exp(-5 * (1 - min(t, rampup) / rampup) ** 2) for t in range(3)]
    np.testing.assert_allclose(metrics["consistency_weight"], want, rtol=1e-5)
    assert (metrics["consistency"] > 0).all() and np.isfinite(metrics["loss"]).all()


def test_teacher_moved_and_is_what_model_keras_holds(single_run):
    keras = single_run["keras"]
    task, result = single_run["task"], single_run["result"]
    teacher = task.teacher.get_weights()
    student = keras.saving.load_model(os.path.join(task.train_config.run_dir, "student.keras"),
                                      compile=False).get_weights()
    exported = keras.saving.load_model(result.model_path, compile=False).get_weights()
    for a, b in zip(exported, teacher, strict=True):
        np.testing.assert_array_equal(a, b)
    moved_from_start = max(np.abs(a - b).max() for a, b in zip(teacher, single_run["initial"], strict=True))
    apart_from_student = max(np.abs(a - b).max() for a, b in zip(teacher, student, strict=True))
    assert moved_from_start > 1e-3 and apart_from_student > 1e-4
    # Batch-norm moving statistics are averaged too (the documented choice): the
    # teacher's are neither their initial values nor the student's.
    names = [w.path for w in task.teacher.weights]
    moving = [i for i, n in enumerate(names) if "moving_mean" in n]
    assert moving
    for i in moving:
        assert np.abs(teacher[i]).max() > 1e-4  # initial moving mean is 0
        assert np.abs(teacher[i] - student[i]).max() > 1e-6


def test_checkpoint_holds_both_models(single_run):
    import tensorflow as tf

    names = [n for n, _ in tf.train.list_variables(single_run["result"].checkpoint)]
    assert any(n.startswith("teacher/") for n in names)
    assert any(n.startswith("model/") for n in names)


def test_tensorboard_shows_channels_consistency_and_ema_decay(single_run):
    from ish_tf.train.tensorboard import event_tags

    tags = event_tags(os.path.join(single_run["cfg"].run_dir, "logs"))
    for tag in ("consistency", "consistency_weight", "ema_decay", "pseudo_label", "channels",
                "composite"):
        assert any(t == tag or t.endswith("/" + tag) for t in tags), (tag, sorted(tags))


def test_channel_composites():
    import tensorflow as tf

    from ish_tf.families.fluorescence.task import channel_composites

    x = tf.zeros((5, 8, 8, 6)) + tf.one_hot(2, 6) * 3.0  # channel 3 bright (z = 3)
    out = channel_composites(x)
    assert out["channels"].shape == (4, 8, 48, 1) and out["composite"].shape == (4, 8, 8, 3)
    strip = out["channels"].numpy()[0, 0, :, 0]
    np.testing.assert_allclose(strip[16:24], 1.0)
    np.testing.assert_allclose(strip[:16], 0.5)
    assert float(tf.reduce_max(out["composite"])) <= 1.0


def test_hypermodel_scores_a_trained_model(single_run):
    from ish_tf.tune import TuneConfig
    from ish_tf.tune.hypermodels import make_hypermodel

    cfg, mc = single_run["cfg"], single_run["task"].model_config
    hm = make_hypermodel(mc, cfg, TuneConfig(out_dir=cfg.run_dir, validation_split="test"))
    score = hm.score(single_run["task"].model, mc, cfg)
    assert score["val_wells"] == 12 and 0.0 <= score["val_accuracy"] <= 1.0
    assert score["val_chance"] == 1 / 6  # 4 training + 2 test identities


def test_plate_assignment_pseudo_labels_refresh_checkpoint_and_resume(tmp_path):
    """--fluorescence_pseudo_labels=plate_assignment: unlabelled sites carry their slot
    (label -2 - k); the table is the teacher's plate-aware assignment recomputed every
    `pseudo_label_every` steps (here at 0 and 2), enters the loss and is checkpointed; a
    run stopped at step 2 and resumed recomputes it from the restored step-2 teacher."""
    import pandas as pd
    import tensorflow as tf

    from ish_tf.families import make_task
    from ish_tf.families.fluorescence.evaluation import plate_pseudo_labels
    from ish_tf.train.trainer import train

    model_config, fields = _setup(tmp_path)
    family = model_config.family
    cfg = _train_config(tmp_path / "run", fields)
    stopped = make_task(copy.deepcopy(model_config), cfg)
    train(stopped, cfg, stop_after=2)
    first = stopped.pseudo.numpy()
    assert len(first) == 12 and set(first) <= {0, 1, 2, 3}  # the training plates' classes
    want = plate_pseudo_labels(lambda x: stopped.teacher(x, training=False), fields["records_dir"],
                               "test", stopped.pipeline, stopped._groups)

    resumed = make_task(copy.deepcopy(model_config), cfg)
    result = train(resumed, cfg)
    assert result.start_step == 2 and result.step == 3
    by_id = dict(zip(want["image_id"], want["pseudo_label"], strict=True))
    np.testing.assert_array_equal(resumed.pseudo.numpy(), [by_id[i] for i in resumed.slots])

    b = family.batch_size
    labels = next(iter(resumed.make_dataset(None, 0)))["label"].numpy()
    slots = -2 - labels[b:]
    assert (labels[:b] >= 0).all() and (slots >= 0).all() and (slots < 12).all()
    metrics = pd.read_csv(os.path.join(cfg.run_dir, "metrics.csv"))
    assert len(metrics) == 3 and (metrics["pseudo_label"] > 0).all()
    names = [n for n, _ in tf.train.list_variables(result.checkpoint)]
    assert any(n.startswith("pseudo_labels") for n in names)

    family.pseudo_label_weight = 0.0
    bad = make_task(copy.deepcopy(model_config), _train_config(tmp_path / "bad", fields))
    with pytest.raises(ValueError, match="pseudo_label_weight > 0"):
        bad.build_model()


def test_mirrored_matches_single_device(single_run, tmp_path):
    """The subprocess trains the same run under MirroredStrategy over two logical CPUs and
    saves its weights; they match the single-device run of this process."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    r = json.loads(lines[-1])
    assert r["replicas"] == 2 and r["teacher_replica_spread"] == 0.0, r
    np.testing.assert_array_equal(r["pseudo_labels"], single_run["task"].pseudo.numpy())
    saved = np.load(tmp_path / "mirrored.npz")
    task = single_run["task"]

    def diff(a, b):
        return float(max(np.abs(x - y).max() for x, y in zip(a, b, strict=True)))

    student = [saved[f"s{i}"] for i in range(len(task.model.weights))]
    teacher = [saved[f"t{i}"] for i in range(len(task.teacher.weights))]
    assert diff(student, single_run["initial"]) > 1e-3  # training moved the weights
    assert diff(student, task.model.get_weights()) < TOL
    assert diff(teacher, task.teacher.get_weights()) < TOL
    # float32 sums of a loss near 100 (consistency weight 100) round at ~1e-5.
    assert abs(r["loss"] - single_run["result"].loss) < TOL * max(1.0, abs(r["loss"]))


def _main(workdir: str) -> None:  # pragma: no cover - runs in the subprocess
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])

    from ish_tf.families import make_task
    from ish_tf.train.trainer import train

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    model_config, fields = _setup(workdir)
    cfg = _train_config(os.path.join(workdir, "mirrored"), fields)
    task = make_task(copy.deepcopy(model_config), cfg)
    result = train(task, cfg, strategy=strategy)
    spread = 0.0
    for v in task.teacher.weights:
        copies = [np.asarray(c) for c in strategy.experimental_local_results(v.value)]
        spread = max(spread, float(max(np.abs(c - copies[0]).max() for c in copies)))
    arrays = {f"s{i}": w for i, w in enumerate(task.model.get_weights())}
    arrays.update({f"t{i}": w for i, w in enumerate(task.teacher.get_weights())})
    np.savez(os.path.join(workdir, "mirrored.npz"), **arrays)
    print(json.dumps({"replicas": strategy.num_replicas_in_sync, "loss": result.loss,
                      "teacher_replica_spread": spread,
                      "pseudo_labels": task.pseudo.numpy().tolist()}))


if __name__ == "__main__":
    _main(sys.argv[1])

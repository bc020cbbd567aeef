"""The trainer's hooks for families whose step differs (ish_tf.train.trainer, tasks, ema).

A toy mean-teacher task: a linear model y = x w + b (3 inputs, 4 weights) trained by
mean squared error on in-memory batches, with an EMA teacher updated in `after_apply`
by a decay ramped with the global step, checkpointed via `checkpoint_items`, and SGD
from `make_optimizer`. Its stats are the step and every student and teacher weight as
read inside the step (before that step's update), so metrics.csv (log_every=1) holds
the whole trajectory and the EMA can be recomputed by hand.

MirroredStrategy over two logical CPUs runs in a subprocess (this file's `__main__`
block), because logical devices must be configured before TensorFlow initialises;
MultiWorkerMirroredStrategy runs two worker processes on 127.0.0.1.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from cluster import run_workers

from ish_tf.families import ModelConfig
from ish_tf.train import TrainConfig
from ish_tf.train.ema import ema_update
from ish_tf.train.tasks import Task, global_mean
from ish_tf.train.trainer import TrainingError, run_paths, train

# Nothing at module level may run a TensorFlow op: the multi-worker processes import
# this module before they create their strategy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IN, GLOBAL, N_BATCHES = 3, 8, 5
_rng = np.random.default_rng(0)
XS = _rng.normal(size=(N_BATCHES, GLOBAL, N_IN)).astype("float32")
YS = (XS @ np.array([[1.0], [-2.0], [0.5]], "float32") + 0.7
      + 0.1 * _rng.normal(size=(N_BATCHES, GLOBAL, 1))).astype("float32")
N_WEIGHTS = N_IN + 1  # kernel (3, 1) and bias (1,)
SGD_LR = 0.05


def decay_at(step):
    """The toy teacher's EMA decay in the step after `step` completed ones: 0.5, 2/3, 3/4, ...
    capped at 0.9 (numpy or tensor)."""
    if isinstance(step, (int, np.integer)):
        return min(1.0 - 1.0 / (step + 2.0), 0.9)
    return tf.minimum(1.0 - 1.0 / (tf.cast(step, tf.float32) + 2.0), 0.9)


def toy_dataset_fn(ctx):
    """Global batch t is (XS[t % N], YS[t % N]); with an input context, this pipeline's
    part of it, one element per replica in replica order."""
    ds = tf.data.Dataset.from_tensor_slices((XS, YS)).repeat()
    if ctx is not None:
        n = GLOBAL // ctx.num_input_pipelines
        first = ctx.input_pipeline_id * n
        ds = ds.map(lambda x, y: (x[first:first + n], y[first:first + n]))
        ds = ds.unbatch().batch(ctx.get_per_replica_batch_size(GLOBAL))
    return ds


def linear_model(seed: int) -> keras.Model:
    x = keras.Input((N_IN,))
    y = keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(seed),
                           bias_initializer=keras.initializers.RandomNormal(seed=seed))(x)
    return keras.Model(x, y)


def flat(weights) -> np.ndarray:
    return np.concatenate([np.asarray(w, "float64").ravel() for w in weights])


class EmaToyTask(Task):
    """Linear regression with an EMA teacher (see the module docstring).

    Args:
      optimizer_fn: `fn(train_config) -> optimizer or None` (make_optimizer).
      teacher: False builds no teacher (a family without one).
    """

    name = "ema_toy"
    stat_names = ("global_step", *(f"s{i}" for i in range(N_WEIGHTS)),
                  *(f"t{i}" for i in range(N_WEIGHTS)))

    def __init__(self, train_config, optimizer_fn=lambda cfg: keras.optimizers.SGD(SGD_LR),
                 teacher=True):
        super().__init__(ModelConfig(seed=0), train_config, toy_dataset_fn)
        self.optimizer_fn = optimizer_fn
        self.with_teacher = teacher
        self.teacher = None

    @property
    def global_batch_size(self) -> int:
        return GLOBAL

    def build_model(self):
        assert self.global_step is not None, "the trainer sets global_step before build_model"
        student = linear_model(1)
        if self.with_teacher:
            # Another initialisation than the student's, so that the EMA shows.
            self.teacher = linear_model(2)
        return student

    def make_optimizer(self, train_config):
        return self.optimizer_fn(train_config)

    def make_records_dataset(self, input_context, start_step=0):
        raise AssertionError("in-memory data only")

    def compute_loss(self, model, batch, training):
        x, y = batch
        loss = global_mean(tf.square(tf.cast(model(x, training=training), tf.float32) - y))
        stats = {"global_step": tf.cast(self.global_step, tf.float32)}
        teacher = self.teacher.weights if self.teacher is not None else self.model.weights
        for prefix, weights in (("s", self.model.weights), ("t", teacher)):
            values = tf.concat([tf.reshape(tf.cast(w, tf.float32), [-1]) for w in weights], 0)
            stats.update({f"{prefix}{i}": values[i] for i in range(N_WEIGHTS)})
        return loss, stats

    def after_apply(self):
        if self.teacher is not None:
            ema_update(self.teacher.weights, self.model.weights, decay_at(self.global_step))

    def checkpoint_items(self):
        return {"teacher": self.teacher} if self.teacher is not None else {}


def toy_config(run_dir, **kw) -> TrainConfig:
    base = dict(run_dir=str(run_dir), steps=6, decay_start=6,
                learning_rate=1e-3, log_every=1, checkpoint_every=3, strategy="default",
                image_summaries=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def run_toy(cfg, strategy=None, stop_after=None, **task_kw):
    """Trains the toy task: (TrainResult, student weights, teacher weights or None)."""
    task = EmaToyTask(cfg, **task_kw)
    result = train(task, cfg, strategy=strategy, stop_after=stop_after)
    teacher = task.teacher.get_weights() if task.teacher is not None else None
    return result, task.model.get_weights(), teacher


def read_metrics(run_dir) -> list[dict[str, float]]:
    with open(run_paths(str(run_dir))["metrics"], newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def trajectory(rows, prefix):
    """(steps, N_WEIGHTS): the weights read inside each logged step, before its update."""
    return np.array([[row[f"{prefix}{i}"] for i in range(N_WEIGHTS)] for row in rows])


def assert_teacher_is_ema(rows, student, teacher):
    """The logged and final teachers equal the EMA, computed here in float64, of the
    logged and final students (the student after k updates is read inside step k + 1)."""
    students = np.vstack([trajectory(rows, "s"), flat(student)])
    teachers = np.vstack([trajectory(rows, "t"), flat(teacher)])
    assert np.abs(students[-1] - students[0]).max() > 1e-2  # the student trained
    want = teachers[0].copy()
    for k in range(len(rows)):  # update k+1 (k steps completed before it) uses decay_at(k)
        want = decay_at(k) * want + (1 - decay_at(k)) * students[k + 1]
        np.testing.assert_allclose(teachers[k + 1], want, atol=1e-6, err_msg=f"after step {k + 1}")
    # A teacher that only copied the student, or never moved, is far from that.
    assert np.abs(teachers[-1] - students[-1]).max() > 1e-2
    assert np.abs(teachers[-1] - teachers[0]).max() > 1e-2


def sgd_gradient(weights, k):
    """d/dw of the mean squared error of global batch k at weights (kernel..., bias)."""
    x, y = XS[k % N_BATCHES].astype("float64"), YS[k % N_BATCHES, :, 0].astype("float64")
    err = x @ weights[:N_IN] + weights[N_IN] - y
    return np.concatenate([2.0 / GLOBAL * x.T @ err, [2.0 / GLOBAL * err.sum()]])


# --------------------------------------------------------------------------- ema_update
def test_ema_update_one_replica_eager_and_compiled():
    """No strategy: Keras and tf variables, a float and a tensor decay, eager and in a
    tf.function; the hand-computed average to float32 precision."""
    target = [keras.Variable(np.full((2, 2), 1.0, "float32")), tf.Variable([4.0, -4.0])]
    source = [keras.Variable(np.full((2, 2), 3.0, "float32")), tf.Variable([0.0, 2.0])]
    ema_update(target, source, 0.75)
    np.testing.assert_allclose(target[0].numpy(), np.full((2, 2), 1.5), atol=1e-7)
    np.testing.assert_allclose(target[1].numpy(), [3.0, -2.5], atol=1e-7)
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def ramped():
        ema_update(target, source, decay_at(step))  # tensor decay: 0.5 at step 0
        step.assign_add(1)

    ramped()
    np.testing.assert_allclose(target[0].numpy(), np.full((2, 2), 2.25), atol=1e-7)
    np.testing.assert_allclose(target[1].numpy(), [1.5, -0.25], atol=1e-7)
    with pytest.raises(ValueError, match="1 targets but 2"):
        ema_update(target[:1], source, 0.5)
    with pytest.raises(ValueError, match="does not match"):
        ema_update(target[::-1], source, 0.5)


# --------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """The toy task for 6 steps uninterrupted, and stopped at 3 then resumed to 6."""
    root = tmp_path_factory.mktemp("hooks")
    full = run_toy(toy_config(root / "full"))
    part_cfg = toy_config(root / "part")
    first = run_toy(part_cfg, stop_after=3)
    second = run_toy(part_cfg)
    return {"root": root, "full": full, "first": first, "second": second}


def test_teacher_is_the_ema_of_the_student_after_each_step(toy_runs):
    result, student, teacher = toy_runs["full"]
    rows = read_metrics(result.run_dir)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert_teacher_is_ema(rows, student, teacher)
    # The task's constant-rate SGD is logged, not the default schedule's 1e-3.
    assert [r["lr"] for r in rows] == pytest.approx([SGD_LR] * 6, rel=1e-6)


def test_hooks_inside_the_xla_compiled_step(tmp_path):
    """--jit_compile: the global step and the EMA update work inside XLA too."""
    cfg = toy_config(tmp_path / "jit", steps=3, jit_compile=True)
    result, student, teacher = run_toy(cfg)
    rows = read_metrics(result.run_dir)
    assert [r["global_step"] for r in rows] == [0, 1, 2]
    assert_teacher_is_ema(rows, student, teacher)


def test_task_optimizer_with_its_own_schedule_is_used_and_logged(tmp_path):
    """SGD with an exponential decay halving the rate each step: each update is the
    hand-computed SGD step at that rate, and metrics.csv logs those rates."""
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    cfg = toy_config(tmp_path / "sgd", steps=4)
    result, student, _ = run_toy(cfg, optimizer_fn=lambda c: keras.optimizers.SGD(schedule),
                                 teacher=False)
    rows = read_metrics(result.run_dir)
    rates = [0.1 * 0.5 ** k for k in range(4)]
    assert [r["lr"] for r in rows] == pytest.approx(rates, rel=1e-6)
    students = np.vstack([trajectory(rows, "s"), flat(student)])
    for k in range(4):
        want = students[k] - rates[k] * sgd_gradient(students[k], k)
        np.testing.assert_allclose(students[k + 1], want, atol=1e-6, err_msg=f"step {k + 1}")


def test_float16_loss_scaling_wraps_the_task_optimizer(tmp_path, monkeypatch):
    """mixed_float16 (forced on CPU) wraps the task's SGD in a LossScaleOptimizer: the
    updates are SGD's (to float16 precision) at the schedule's rates, a step whose scaled
    gradients overflowed (grad_norm inf) is skipped and does not advance the schedule,
    the rate logged is the one of the last update made, and the teacher is still the
    EMA of the float32 student weights (after a skipped step too)."""
    from ish_tf.train import trainer

    monkeypatch.setattr(trainer, "set_precision", lambda enabled: (
        keras.mixed_precision.set_global_policy("mixed_float16") or "mixed_float16"))
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    cfg = toy_config(tmp_path / "f16", steps=4, mixed_precision=True)
    result, student, teacher = run_toy(cfg, optimizer_fn=lambda c: keras.optimizers.SGD(schedule))
    rows = read_metrics(result.run_dir)
    students = np.vstack([trajectory(rows, "s"), flat(student)])
    applied = 0
    for k, row in enumerate(rows):
        if np.isfinite(row["grad_norm"]):
            rate = 0.1 * 0.5 ** applied
            applied += 1
            step = rate * sgd_gradient(students[k], k)
            np.testing.assert_allclose(students[k + 1], students[k] - step,
                                       atol=2e-2 * np.abs(step).max(), err_msg=f"step {k + 1}")
        else:
            np.testing.assert_array_equal(students[k + 1], students[k])
        assert row["lr"] == pytest.approx(0.1 * 0.5 ** max(applied - 1, 0), rel=1e-6), k
    assert applied >= 2
    assert_teacher_is_ema(rows, student, teacher)
    assert keras.mixed_precision.global_policy().name == "float32"


def test_checkpoint_without_the_task_items_does_not_fit(tmp_path):
    cfg = toy_config(tmp_path / "plain", steps=3)
    run_toy(cfg, stop_after=1, teacher=False)
    with pytest.raises(TrainingError, match="new --run_dir"):
        run_toy(cfg)


def test_checkpoint_items_may_not_use_reserved_names(tmp_path):
    class Clash(EmaToyTask):
        def checkpoint_items(self):
            return {"model": self.teacher}

    cfg = toy_config(tmp_path / "clash", steps=1)
    with pytest.raises(ValueError, match="reserved names"):
        train(Clash(cfg), cfg)


def test_global_step_is_visible_in_compute_loss(toy_runs):
    """Inside the step of row `step`, the global step reads the steps completed before it
    (resumed runs included: the counter is restored)."""
    for run in ("full", "second"):
        rows = read_metrics(toy_runs[run][0].run_dir)
        assert [r["global_step"] for r in rows] == [0, 1, 2, 3, 4, 5], run
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6], run


def test_before_step_runs_eagerly_before_each_step_and_on_resume(tmp_path):
    """`before_step(step)` is called with the steps completed so far, before that step,
    also as the first call of a resumed run; what it assigns is what the step reads."""

    class Marked(EmaToyTask):
        calls: list[tuple[int, bool]] = []

        def build_model(self):
            self.mark = tf.Variable(-1.0, trainable=False)
            return super().build_model()

        def before_step(self, step):
            Marked.calls.append((step, tf.executing_eagerly()))
            self.mark.assign(float(step) * 10.0)

        def compute_loss(self, model, batch, training):
            loss, stats = super().compute_loss(model, batch, training)
            return loss, {**stats, "mark": tf.identity(self.mark)}

    Marked.stat_names = (*EmaToyTask.stat_names, "mark")
    cfg = toy_config(tmp_path / "marked", steps=4, checkpoint_every=2)
    train(Marked(cfg), cfg, stop_after=2)
    train(Marked(cfg), cfg)
    assert Marked.calls == [(0, True), (1, True), (2, True), (3, True)]
    assert [r["mark"] for r in read_metrics(cfg.run_dir)] == [0.0, 10.0, 20.0, 30.0]


def test_resume_restores_the_teacher_exactly(toy_runs):
    first, second = toy_runs["first"], toy_runs["second"]
    assert first[0].step == 3 and second[0].start_step == 3 and second[0].step == 6
    _, full_student, full_teacher = toy_runs["full"]
    for a, b in zip(full_student + full_teacher, second[1] + second[2], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # After the stop the teacher had moved: a fresh one at the resume would differ.
    assert np.abs(flat(first[2]) - flat(linear_model(2).get_weights())).max() > 1e-3
    assert np.abs(flat(second[2]) - flat(full_teacher)).max() < 1e-6


# --------------------------------------------------------------------------- MirroredStrategy
def _run_mirrored_check() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"mirrored check failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-5000:]}")
    return json.loads(lines[-1])


def test_mirrored_ema_teacher_matches_single_device():
    """Two replicas (logical CPUs): ema_update keeps both copies of a mirrored variable
    equal and right, from a replica context with a per-replica tensor decay and from the
    cross-replica context, whatever the variable's aggregation (NONE, SUM); the trainer's
    student and teacher equal the one-device run's."""
    r = _run_mirrored_check()
    assert r["replicas"] == 2
    # 1 -> 0.5 * 1 + 0.5 * 3 = 2 (replica context, decay_at(0)), then
    # 0.75 * 2 + 0.25 * 3 = 2.25 (cross-replica); likewise 1 -> 3 -> 3.5 for source 5.
    assert r["ema_copies"] == [[2.25, 3.5]] * 4, r  # 2 variables x 2 copies
    assert r["steps"] == 4 and r["student_moved"] > 1e-2 and r["teacher_moved"] > 1e-2, r
    assert r["student_max_abs_diff"] < 1e-6 and r["teacher_max_abs_diff"] < 1e-6, r
    assert r["teacher_copies_max_abs_diff"] == 0.0, r


# --------------------------------------------------------------------------- multi-worker
WORKER = r"""
import sys
import numpy as np
out_npz, run_dir, tests_dir = sys.argv[1:4]
sys.path.insert(0, tests_dir)
import test_trainer_hooks as hooks

cfg = hooks.toy_config(run_dir, steps=4, checkpoint_every=2, strategy="multi_worker")
result, student, teacher = hooks.run_toy(cfg)
np.savez(out_npz, *student, *teacher)
print("RESULT", result.step, repr(result.loss), flush=True)
"""


def test_multi_worker_ema_teacher_matches_single_device(tmp_path):
    """Two worker processes (one CPU replica each, 4 examples of every 8): both end with
    the one-device run's student and teacher."""
    reference = {}

    def one_device():
        # The one-device reference while the workers start.
        _, reference["student"], reference["teacher"] = run_toy(
            toy_config(tmp_path / "single", steps=4, checkpoint_every=2))

    run_workers(WORKER, lambda i: [str(tmp_path / f"w{i}.npz"), str(tmp_path / "mw"),
                                   os.path.join(ROOT, "tests")],
                cwd=ROOT, pythonpath=ROOT, meanwhile=one_device)
    student, teacher = reference["student"], reference["teacher"]
    w0, w1 = (np.load(tmp_path / f"w{i}.npz") for i in range(2))
    assert len(w0.files) == len(student) + len(teacher)
    for key in w0.files:
        np.testing.assert_array_equal(w0[key], w1[key])
    for got, want in zip((w0[k] for k in w0.files), student + teacher, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(flat(teacher) - flat(linear_model(2).get_weights())).max() > 1e-2


def _main() -> None:  # pragma: no cover - runs in the subprocess
    cpus = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import tempfile

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        target = keras.Variable(np.ones(2, "float32"))
        source = keras.Variable(np.array([3.0, 5.0], "float32"))
        # A plain assign in a replica context would sum the replicas' values into this one.
        summed = tf.Variable(np.ones(2, "float32"), aggregation=tf.VariableAggregation.SUM)
        step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def in_replicas():
        strategy.run(lambda: ema_update([target, summed], [source, source], decay_at(step)))

    in_replicas()
    ema_update([target, summed], [source, source], 0.75)
    copies = [v.numpy().tolist() for var in (target.value, summed)
              for v in strategy.experimental_local_results(var)]

    def max_diff(a, b):
        return float(np.max(np.abs(flat(a) - flat(b))))

    out = {"replicas": strategy.num_replicas_in_sync, "ema_copies": copies}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for name, strat in (("single", tf.distribute.get_strategy()), ("mirrored", strategy)):
            cfg = toy_config(os.path.join(tmp, name), steps=4, checkpoint_every=2)
            task = EmaToyTask(cfg)
            result = train(task, cfg, strategy=strat)
            runs[name] = (result, task.model.get_weights(), task.teacher.get_weights())
            if name == "mirrored":
                out["teacher_copies_max_abs_diff"] = max(
                    float(np.max(np.abs(a.numpy() - b.numpy())))
                    for w in task.teacher.weights
                    for a, b in [strategy.experimental_local_results(w.value)])
    out.update({
        "steps": runs["mirrored"][0].step,
        "student_moved": max_diff(runs["single"][1], linear_model(1).get_weights()),
        "teacher_moved": max_diff(runs["single"][2], linear_model(2).get_weights()),
        "student_max_abs_diff": max_diff(runs["single"][1], runs["mirrored"][1]),
        "teacher_max_abs_diff": max_diff(runs["single"][2], runs["mirrored"][2]),
    })
    print(json.dumps(out))


if __name__ == "__main__":
    _main()

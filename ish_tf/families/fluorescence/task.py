"""Training tasks of the fluorescence families.

`FluorescenceTask` (`--model=fluorescence`): labelled sites of the training split,
normalised per plate (`data`), one augmented view each; loss = softmax cross-entropy
of the ArcFace logits with the angular margin on the target (or of a plain softmax
head), averaged over the global batch.

`MeanTeacherTask` (`--model=mean_teacher`, Tarvainen & Valpola 2017 as used by
DeepNoise): a student (the trained model) and a teacher of the same architecture whose
weights are the exponential moving average of the student's, updated after every
optimizer step (`after_apply`, through the strategy: `ish_tf.train.ema.ema_update`)
with a decay ramped by the global step (`ema_decays` from `ema_steps` on: 0.5 -> 0.9
-> 0.99 -> 0.999). Each global batch holds `batch_size` labelled training sites and
`unlabelled_batch_size` sites of `unlabelled_split` (held-out experiments; labels never
read: set to -1, or to -2 - k, the site's pseudo-label slot). Student and teacher see
differently augmented views (another dihedral transform and normalisation jitter). Loss =
  cross-entropy (labelled sites, ArcFace margin)
  + w(t) * mean over sites and classes of (softmax(student) - softmax(teacher))^2
  + pseudo_label_weight * cross-entropy to the unlabelled sites' pseudo-labels,
with w(t) = consistency_weight * exp(-5 (1 - min(t, T)/T)^2), T = consistency_rampup.
Pseudo-labels (`pseudo_labels`): "argmax", the teacher's argmax on the batch (DeepNoise's
public code, weight 0.05); or "plate_assignment", the teacher's plate-aware assignment
(`evaluation.plate_pseudo_labels`: wells of a plate assigned one-to-one to the classes
of the plate's group) of every unlabelled site, recomputed in `before_step` every
`pseudo_label_every` steps into a checkpointed table that the loss reads by the site's
slot (its label -2 - k), with the ArcFace margin like a label.

Teacher batch norm (a documented choice; a teacher whose moving statistics stay at
their initial values is a known failure): the teacher runs in inference mode on its
own moving statistics, which with `teacher_batch_norm="ema"` (default) are averaged
from the student's exactly like the weights (`teacher.weights` includes them), and with
"student" are copied from the student after every step. The small CNN synchronises its
batch statistics across replicas, so these are the same on every replica.

Both models are checkpointed (`checkpoint_items`: the teacher); `finalize_model`
writes the student to RUN/student.keras and puts the teacher's weights into the model
that becomes RUN/model.keras, so `bin/export` exports the teacher.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from ish_tf.models.arcface import arcface_margin_logits
from ish_tf.train import TrainConfig
from ish_tf.train.tasks import DatasetFn, Task, global_mean

STUDENT_NAME = "student.keras"


def global_masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask` over the global batch (0 when nothing is masked in)."""
    mask = tf.cast(mask, tf.float32)
    total = tf.reduce_sum(tf.cast(values, tf.float32) * mask)
    count = tf.reduce_sum(mask)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
    return tf.math.divide_no_nan(total, count)


def ramp_value(step, steps, values) -> tf.Tensor:
    """values[i] for the last i with steps[i] <= step (steps[0] = 0): the EMA decay."""
    step = tf.cast(step, tf.int64)
    count = tf.reduce_sum(tf.cast(tf.constant(steps, tf.int64) <= step, tf.int32))
    return tf.gather(tf.constant(values, tf.float32), tf.maximum(count - 1, 0))


def consistency_ramp(step, rampup: int, weight: float) -> tf.Tensor:
    """weight * exp(-5 (1 - min(t, T)/T)^2) (Laine & Aila's sigmoid ramp-up); weight at T=0."""
    if rampup <= 0:
        return tf.constant(weight, tf.float32)
    t = tf.minimum(tf.cast(step, tf.float32), float(rampup)) / float(rampup)
    return weight * tf.exp(-5.0 * tf.square(1.0 - t))


def technical_noise(images: tf.Tensor, seed: tf.Tensor, strength: float) -> tf.Tensor:
    """Technical noise that per-plate normalisation leaves in place, drawn per site from a
    stateless `seed`: a multiplicative illumination field (linear gradient up to 0.35 *
    strength in a random direction, vignetting up to 0.3 * strength, well-edge dimming up
    to 0.35 * strength) and focus blur (a blend towards a sigma-1.2 Gaussian blur, up to
    `strength`, capped at 1). Images are normalised (b, S, S, C) z-scores; the field
    scales each site's deviation from its plate's mean, as a gain on the raw signal does."""
    if strength <= 0:
        return images
    b = tf.shape(images)[0]
    size = images.shape[1]
    u = tf.random.stateless_uniform([b, 5], seed, 0.0, 1.0)
    lin = tf.linspace(-1.0, 1.0, size)
    gy, gx = tf.meshgrid(lin, lin, indexing="ij")
    angle = u[:, 0, None, None] * 6.2831853
    field = (1.0 + 0.35 * strength * u[:, 1, None, None]
             * (tf.cos(angle) * gx + tf.sin(angle) * gy)
             - 0.3 * strength * u[:, 2, None, None] * (gx**2 + gy**2) / 2
             - 0.35 * strength * u[:, 3, None, None])
    x = images * field[..., None]
    taps = tf.exp(-tf.square(tf.range(-3.0, 4.0)) / (2 * 1.2**2))
    taps = taps / tf.reduce_sum(taps)
    channels = x.shape[-1]
    kx = tf.tile(tf.reshape(taps, [1, 7, 1, 1]), [1, 1, channels, 1])
    ky = tf.tile(tf.reshape(taps, [7, 1, 1, 1]), [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(x, kx, [1, 1, 1, 1], "SAME")
    blurred = tf.nn.depthwise_conv2d(blurred, ky, [1, 1, 1, 1], "SAME")
    alpha = tf.minimum(strength * u[:, 4], 1.0)[:, None, None, None]
    return x + alpha * (blurred - x)


def noisy_batches(ds: tf.data.Dataset, strength: float, seed: int, views: int,
                  start_step: int = 0) -> tf.data.Dataset:
    """`technical_noise` on each of the first `views` elements of each batch (labels last),
    seeded by the batch's global index (`start_step` on: a resumed run draws the same)."""
    if strength <= 0:
        return ds

    def noise(i, batch):
        out = [technical_noise(batch[v], tf.stack([tf.cast(seed + 104729, tf.int64), i * 4 + v]),
                               strength) for v in range(views)]
        return (*out, *batch[views:])

    return ds.enumerate(start=int(start_step)).map(noise, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True)


class FluorescenceTask(Task):
    """Supervised siRNA classification of normalised multi-channel sites.

    Batches: (images float32 (b, R, R, C), labels int32 (b,)).

    Raises:
      ValueError: records that are not multi-channel images, or classes/channels that
        disagree with the config.
    """

    name = "fluorescence"
    stat_names = ("cross_entropy", "accuracy")

    def __init__(self, model_config, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.pipeline = None
        if train_config.records_dir and dataset_fn is None:
            self._read_records_facts(train_config.records_dir)
        model_config.family.validate()

    def _read_records_facts(self, records_dir: str) -> None:
        from ish_tf.data import shards
        from ish_tf.families.fluorescence.data import make_pipeline

        family = self.model_config.family
        spec = shards.records_input_spec(records_dir)
        if spec.kind != "image" or spec.channels != family.channels:
            raise ValueError(f"--records_dir={records_dir} holds {spec.describe()} records; "
                             f"--model={self.model_config.model} takes {family.channels}-channel "
                             "images (--fluorescence_channels)")
        info = shards.load_dataset_info(records_dir)
        if info is not None:
            classes = tuple(g.gene_symbol for g in sorted(info.genes, key=lambda g: g.gene_index))
            if family.classes and tuple(family.classes) != classes:
                raise ValueError(f"the model's {len(family.classes)} classes differ from the "
                                 f"{len(classes)} identities of {records_dir}")
            family.classes = classes  # persisted in model_config.json
        self.pipeline = make_pipeline(records_dir, family.normalization, family.norm_jitter,
                                      self.model_config.input_size)

    def build_model(self) -> keras.Model:
        """The network, started from `init_from`'s weights when given (fine-tuning)."""
        family = self.model_config.family
        model = self.model_config.spec.build(self.model_config)
        if family.init_from:
            from ish_tf.export.saved_model import load_keras_file

            if not os.path.exists(family.init_from):
                raise ValueError(f"--fluorescence_init_from={family.init_from}: no such file")
            start = load_keras_file(family.init_from)
            if [w.shape for w in start.weights] != [w.shape for w in model.weights]:
                raise ValueError(f"--fluorescence_init_from={family.init_from} is not this "
                                 "architecture (another backbone, head or class count)")
            model.set_weights(start.get_weights())
        return model

    def _sites(self, split, batch_size, input_context, start_step, views, unlabelled,
               slots=None):
        from ish_tf.families.fluorescence.data import training_sites

        if not self.train_config.records_dir:
            raise ValueError("--records_dir is required: multi-channel site records "
                             "(bin/ingest --layout=rxrx1, bin/extract)")
        seed = self.train_config.seed + (7919 if unlabelled else 0)
        ds = training_sites(self.train_config.records_dir, split, self.pipeline,
                            batch_size=batch_size, seed=self.train_config.seed, views=views,
                            unlabelled=unlabelled, input_context=input_context,
                            start_step=start_step, augment=self.train_config.flips,
                            slots=slots)
        noise = self.model_config.family.noise_augment if self.train_config.flips else 0.0
        return noisy_batches(ds, noise, seed, views, start_step)

    def make_records_dataset(self, input_context, start_step: int = 0) -> tf.data.Dataset:
        family = self.model_config.family
        return self._sites(self.train_config.split, family.batch_size, input_context,
                           start_step, views=1, unlabelled=False)

    def supervised_loss(self, logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """Per-site cross-entropy (b,) of the head's logits (ArcFace: margin on the target);
        0 where the label is -1."""
        family = self.model_config.family
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        logits = tf.cast(logits, tf.float32)
        if family.head == "arcface":
            logits = arcface_margin_logits(logits, labels, family.arcface_scale,
                                           family.arcface_margin)
        xent = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.maximum(labels, 0), logits)
        return tf.where(labels >= 0, xent, 0.0)

    def compute_loss(self, model, batch, training):
        images, labels = batch
        outputs = model(images, training=training)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        xent = global_mean(self.supervised_loss(outputs[2], labels))
        correct = tf.equal(tf.argmax(outputs[1], -1, output_type=tf.int32), labels)
        return xent, {"cross_entropy": xent, "accuracy": global_mean(tf.cast(correct, tf.float32))}

    def image_summaries(self, batch):
        images = batch[0] if isinstance(batch, tuple) else batch["student"]
        return channel_composites(images)


def channel_composites(images: tf.Tensor, n: int = 4) -> dict[str, tf.Tensor]:
    """TensorBoard images of normalised sites: each channel side by side (gray), and an
    RGB composite (the RxRx1 colours: blue, green, red, cyan, magenta, yellow)."""
    x = tf.cast(images[:n], tf.float32)
    x = tf.clip_by_value((x + 3.0) / 6.0, 0.0, 1.0)  # z-scores -3..3 -> 0..1
    channels = x.shape[-1]
    strips = tf.concat([x[..., c:c + 1] for c in range(channels)], axis=2)
    colours = tf.constant([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]],
                          tf.float32)
    colours = tf.gather(colours, tf.range(channels) % 6)
    rgb = tf.einsum("bhwc,ck->bhwk", x, colours) / tf.maximum(tf.reduce_sum(colours, 0), 1.0)
    return {"channels": strips, "composite": tf.clip_by_value(rgb, 0.0, 1.0)}


class MeanTeacherTask(FluorescenceTask):
    """The mean teacher (see the module docstring).

    Batches: {"student": (b, R, R, C), "teacher": (b, R, R, C), "label": (b,)} with the
    labelled sites first and the unlabelled ones (label -1, or -2 - k with plate-assignment
    pseudo-labels: slot k of the table) after them.
    """

    name = "mean_teacher"
    stat_names = ("cross_entropy", "consistency", "consistency_weight", "pseudo_label",
                  "ema_decay", "accuracy", "teacher_accuracy")

    def __init__(self, model_config, train_config: TrainConfig,
                 dataset_fn: DatasetFn | None = None):
        super().__init__(model_config, train_config, dataset_fn)
        self.teacher: keras.Model | None = None
        # Plate-assignment pseudo-labels: one slot per unlabelled site (image ids in
        # file order), the table of their labels (-1: none yet) and the class groups.
        self.slots: list[int] | None = None
        self.pseudo: tf.Variable | None = None
        self._groups = None

    @property
    def global_batch_size(self) -> int:
        family = self.model_config.family
        return family.batch_size + family.unlabelled_batch_size

    def build_model(self) -> keras.Model:
        student = super().build_model()
        teacher = self.model_config.spec.build(self.model_config)
        # The teacher starts as the student (Tarvainen & Valpola) and is never trained.
        teacher.set_weights(student.get_weights())
        teacher.trainable = False
        self.teacher = teacher
        if self.model_config.family.pseudo_labels == "plate_assignment":
            self._build_pseudo_labels()
        return student

    def _build_pseudo_labels(self) -> None:
        from ish_tf.families.fluorescence.evaluation import plate_labels, training_class_groups

        family = self.model_config.family
        records_dir = self.train_config.records_dir
        if not records_dir or self._dataset_fn is not None:
            raise ValueError("--fluorescence_pseudo_labels=plate_assignment needs --records_dir "
                             "(the plates of the unlabelled wells)")
        if family.unlabelled_batch_size == 0 or family.pseudo_label_weight <= 0:
            raise ValueError("--fluorescence_pseudo_labels=plate_assignment needs "
                             "--fluorescence_unlabelled_batch_size > 0 and "
                             "--fluorescence_pseudo_label_weight > 0")
        # Only the ids and plates of the unlabelled sites are used, never their labels.
        sites = plate_labels(records_dir, family.unlabelled_split)
        self.slots = [int(i) for i in sites["image_id"]]
        if len(set(self.slots)) != len(self.slots):
            raise ValueError(f"{records_dir}: the {family.unlabelled_split} split repeats image "
                             "ids; plate-assignment pseudo-labels need one id per site")
        self._groups = training_class_groups(records_dir, self.train_config.split)
        self.pseudo = tf.Variable(tf.fill([len(self.slots)], -1), trainable=False,
                                  dtype=tf.int32, name="pseudo_labels")

    def checkpoint_items(self):
        items = {"teacher": self.teacher}
        if self.pseudo is not None:
            items["pseudo_labels"] = self.pseudo
        return items

    def before_step(self, step: int) -> None:
        """Plate-assignment pseudo-labels: recomputed from the teacher at step 0 and every
        `pseudo_label_every` steps (only at step 0 when 0); a resumed run keeps the
        checkpointed ones until the next."""
        every = self.model_config.family.pseudo_label_every
        if self.pseudo is None or (step % every if every else step):
            return
        import numpy as np
        from absl import logging

        from ish_tf.families.fluorescence.evaluation import plate_pseudo_labels

        split = self.model_config.family.unlabelled_split
        table = plate_pseudo_labels(lambda x: self.teacher(x, training=False),
                                    self.train_config.records_dir, split, self.pipeline,
                                    self._groups)
        by_id = dict(zip(table["image_id"], table["pseudo_label"], strict=True))
        missing = [i for i in self.slots if i not in by_id]
        if missing:
            raise ValueError(f"pseudo-labels: {len(missing)} sites of {split} were not "
                             f"predicted, e.g. image_id {missing[0]}")
        values = np.array([by_id[i] for i in self.slots], np.int32)
        before = self.pseudo.numpy()
        self.pseudo.assign(values)
        changed = int(np.sum(before != values)) if (before >= 0).any() else len(values)
        logging.info("step %d: plate-assignment pseudo-labels of %d %s sites from the "
                     "teacher (%d changed)", step, len(values), split, changed)

    def make_records_dataset(self, input_context, start_step: int = 0) -> tf.data.Dataset:
        family = self.model_config.family
        labelled = self._sites(self.train_config.split, family.batch_size, input_context,
                               start_step, views=2, unlabelled=False)
        if family.unlabelled_batch_size == 0:
            return labelled.map(lambda s, t, y: {"student": s, "teacher": t, "label": y})
        unlabelled = self._sites(family.unlabelled_split, family.unlabelled_batch_size,
                                 input_context, start_step, views=2, unlabelled=True,
                                 slots=self.slots)

        def join(a, b):
            return {"student": tf.concat([a[0], b[0]], 0), "teacher": tf.concat([a[1], b[1]], 0),
                    "label": tf.concat([a[2], b[2]], 0)}

        return tf.data.Dataset.zip(labelled, unlabelled).map(join)

    def ema_decay(self) -> tf.Tensor:
        family = self.model_config.family
        return ramp_value(self.global_step, tuple(int(s) for s in family.ema_steps),
                          tuple(float(d) for d in family.ema_decays))

    def consistency_weight(self) -> tf.Tensor:
        family = self.model_config.family
        return consistency_ramp(self.global_step, family.consistency_rampup,
                                family.consistency_weight)

    def compute_loss(self, model, batch, training):
        family = self.model_config.family
        labels = tf.cast(tf.reshape(batch["label"], [-1]), tf.int32)
        student = model(batch["student"], training=training)
        teacher = self.teacher(batch["teacher"], training=False)
        p_student = tf.nn.softmax(tf.cast(student[2], tf.float32))
        p_teacher = tf.stop_gradient(tf.cast(teacher[1], tf.float32))
        labelled = labels >= 0
        xent = global_masked_mean(self.supervised_loss(student[2], labels), labelled)
        consistency = global_mean(tf.reduce_mean(tf.square(p_student - p_teacher), -1))
        weight = self.consistency_weight()
        loss = xent + weight * consistency
        pseudo = tf.constant(0.0)
        if self.pseudo is not None:
            from ish_tf.families.fluorescence.data import unlabelled_slot

            slot = unlabelled_slot(labels)
            targets = tf.where(slot >= 0, tf.gather(self.pseudo, tf.maximum(slot, 0)), -1)
            pseudo = global_masked_mean(self.supervised_loss(student[2], targets), targets >= 0)
            loss = loss + family.pseudo_label_weight * pseudo
        elif family.pseudo_label_weight > 0:
            targets = tf.argmax(p_teacher, -1, output_type=tf.int32)
            pl = tf.nn.sparse_softmax_cross_entropy_with_logits(
                targets, tf.cast(student[2], tf.float32))
            pseudo = global_masked_mean(pl, tf.logical_not(labelled))
            loss = loss + family.pseudo_label_weight * pseudo
        s_ok = tf.equal(tf.argmax(p_student, -1, output_type=tf.int32), labels)
        t_ok = tf.equal(tf.argmax(p_teacher, -1, output_type=tf.int32), labels)
        return loss, {"cross_entropy": xent, "consistency": consistency,
                      "consistency_weight": weight, "pseudo_label": pseudo,
                      "ema_decay": self.ema_decay(),
                      "accuracy": global_masked_mean(tf.cast(s_ok, tf.float32), labelled),
                      "teacher_accuracy": global_masked_mean(tf.cast(t_ok, tf.float32), labelled)}

    def after_apply(self) -> None:
        from ish_tf.train.ema import ema_update

        decay = self.ema_decay()
        if self.model_config.family.teacher_batch_norm == "ema":
            ema_update(self.teacher.weights, self.model.weights, decay)
        else:
            # Pair by position: the teacher is frozen, so its own trainable flags are off.
            trainable = {id(v) for v in self.model.trainable_weights}
            pairs = list(zip(self.teacher.weights, self.model.weights, strict=True))
            ema_update([t for t, s in pairs if id(s) in trainable],
                       [s for t, s in pairs if id(s) in trainable], decay)
            ema_update([t for t, s in pairs if id(s) not in trainable],
                       [s for t, s in pairs if id(s) not in trainable], 0.0)

    def finalize_model(self, model: keras.Model) -> str:
        from ish_tf.train.trainer import save_keras_model

        path = os.path.join(self.train_config.run_dir, STUDENT_NAME)
        save_keras_model(model, path)
        model.set_weights(self.teacher.get_weights())
        return f"model.keras holds the EMA teacher; the student is in {path}"

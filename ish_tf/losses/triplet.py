"""Triplet losses for gene re-identification: batch-hard, batch-all and semi-hard mining.

Written from scratch because tensorflow-addons is end-of-life and does not import
under Keras 3. The formulation follows Hermans, Beyer & Leibe, "In Defense of the
Triplet Loss for Person Re-Identification" (2017; code: VisualComputingInstitute/
triplet-reid), which Abed-Esfahani et al. (PLoS ONE 2022) used for ISH images, and
Schroff et al., "FaceNet" (2015) for semi-hard mining.

Everything is built from masks over the `(B, B)` distance matrix (and a `(B, B, B)`
tensor for batch-all and semi-hard), never from data-dependent shapes, so every
function runs eagerly, inside `tf.function`, under XLA (`jit_compile=True`) and with
a batch size unknown until run time.

Notation (used in all docstrings below):

* `B` is the batch size, `D` the embedding dimension.
* For anchor `a`, a *positive* `p` is another sample with the same label
  (`p != a`), a *negative* `n` is a sample with a different label.
* `d(a, b)` is the distance under the chosen metric, and `x = d(a, p) - d(a, n)`.
* The per-triplet term is `softplus(x) = ln(1 + e^x)` for `margin="soft"` and
  `max(x + m, 0)` for a numeric margin `m`.
* A triplet is *active* when it still pushes the embedding: for a numeric margin
  when its term is > 0 (i.e. `x + m > 0`); for the soft margin, whose term is never
  exactly 0, when the ordering is violated, `d(a, p) > d(a, n)` (`x > 0`) -- the same
  rule as a numeric margin of 0.

Worked examples (what the tests check):

* Soft margin, one anchor with `d(a, p) = 1`, `d(a, n) = 2`: `x = -1`, term
  `ln(1 + e^-1) = 0.31326`; not active (`x < 0`).
* Margin 0.5, same distances: `max(-1 + 0.5, 0) = 0`, not active. With
  `d(a, p) = 2`, `d(a, n) = 2.2`: `max(-0.2 + 0.5, 0) = 0.3`, active.
* Four points on a line `[0], [1], [3], [7]` with labels `[0, 0, 1, 1]`, euclidean,
  margin 1, batch-hard: anchor 0 has hardest positive 1 (at 1) and hardest negative
  3 (at 3): `max(1 - 3 + 1, 0) = 0`; anchor 1: pos 1, neg 2 -> `0`; anchor 3: pos 4,
  neg 2 -> `3`; anchor 7: pos 4, neg 6 -> `0`. Loss `3 / 4 = 0.75`,
  active_fraction `0.25`, mean_d_pos `(1 + 1 + 4 + 4) / 4 = 2.5`, mean_d_neg
  `(3 + 2 + 2 + 6) / 4 = 3.25`, top1 `0.75` (point 3's nearest is 1, label 0),
  embedding_norm `(0 + 1 + 3 + 7) / 4 = 2.75`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import tensorflow as tf

Margin = str | float
Stats = dict[str, tf.Tensor]
LossFn = Callable[..., tuple[tf.Tensor, Stats]]

METRICS: tuple[str, ...] = ("euclidean", "sqeuclidean", "cityblock")
MINING: tuple[str, ...] = ("batch_hard", "batch_all", "semi_hard")
STAT_NAMES: tuple[str, ...] = ("active_fraction", "mean_d_pos", "mean_d_neg", "top1",
                               "embedding_norm")

# Added under the square root so that d/dx sqrt(x) stays finite where two embeddings
# coincide (always true on the diagonal, often for identical images); the value of
# triplet-reid. It shifts distances by at most 1e-6.
EUCLIDEAN_EPSILON = 1e-12


# --------------------------------------------------------------------------- validation
def check_metric(metric: str) -> str:
    """Returns `metric` if it is a known distance name.

    Args:
      metric: one of `METRICS`.

    Returns:
      The same name.

    Raises:
      ValueError: naming the bad value and listing the valid ones.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown distance metric {metric!r}; expected one of {list(METRICS)}")
    return metric


def check_mining(mining: str) -> str:
    """Returns `mining` if it is a known mining strategy.

    Args:
      mining: one of `MINING`.

    Returns:
      The same name.

    Raises:
      ValueError: naming the bad value and listing the valid ones.
    """
    if mining not in MINING:
        raise ValueError(f"unknown triplet mining {mining!r}; expected one of {list(MINING)}")
    return mining


def check_margin(margin: Margin) -> Margin:
    """Normalises a margin: "soft", or a non-negative finite number.

    Numeric strings (as they come from a flag, e.g. "0.2") are accepted and
    converted to float, so a `--margin` flag can hold either form.

    Args:
      margin: "soft", a number >= 0, or a string holding such a number.

    Returns:
      "soft" or a Python float.

    Raises:
      ValueError: naming the bad value and listing the valid forms.
    """
    valid = "expected 'soft' or a non-negative finite number such as 0.2"
    if isinstance(margin, str):
        if margin == "soft":
            return margin
        try:
            value = float(margin)
        except ValueError:
            raise ValueError(f"unknown triplet margin {margin!r}; {valid}") from None
    elif isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f"unknown triplet margin {margin!r}; {valid}")
    else:
        value = float(margin)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"bad triplet margin {margin!r}; {valid}")
    return value


# --------------------------------------------------------------------------- distances
def pairwise_distances(embeddings: tf.Tensor, metric: str = "euclidean") -> tf.Tensor:
    """All pairwise distances within a batch.

    Computed from explicit differences (a `(B, B, D)` intermediate) rather than the
    `|a|^2 + |b|^2 - 2ab` expansion: it is exact to float32 rounding (the expansion
    loses several digits to cancellation) and is what cityblock needs anyway. For
    embedding sizes used here (B <= 512, D <= 256) the intermediate is at most 256 MB.

    Args:
      embeddings: `(B, D)` float tensor; computed in float32 whatever its dtype.
      metric: "euclidean" (`sqrt(max(d^2, 0) + 1e-12)`, whose gradient is finite
        at 0), "sqeuclidean" (`d^2`) or "cityblock" (L1).

    Returns:
      `(B, B)` float32 tensor of distances; the diagonal is 0 (1e-6 for euclidean).

    Raises:
      ValueError: unknown metric, or embeddings whose rank is known and is not 2.
    """
    check_metric(metric)
    embeddings = _as_embeddings(embeddings)
    diffs = embeddings[:, None, :] - embeddings[None, :, :]  # (B, B, D)
    if metric == "cityblock":
        return tf.reduce_sum(tf.abs(diffs), axis=-1)
    squared = tf.reduce_sum(tf.square(diffs), axis=-1)
    if metric == "sqeuclidean":
        return squared
    return tf.sqrt(tf.maximum(squared, 0.0) + EUCLIDEAN_EPSILON)


def _as_embeddings(embeddings) -> tf.Tensor:
    """`(B, D)` float32 tensor from any float input (mixed-precision outputs included)."""
    embeddings = tf.convert_to_tensor(embeddings)
    if embeddings.shape.rank is not None and embeddings.shape.rank != 2:
        raise ValueError(f"embeddings must have shape (B, D); got shape {embeddings.shape}")
    return tf.cast(embeddings, tf.float32)


def _as_labels(labels) -> tf.Tensor:
    """`(B,)` labels from `(B,)` or `(B, 1)` input (Keras hands `y_true` as `(B, 1)`)."""
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank is not None and labels.shape.rank > 2:
        raise ValueError(f"labels must have shape (B,) or (B, 1); got shape {labels.shape}")
    return tf.reshape(labels, [-1])


# --------------------------------------------------------------------------- helpers
def _term(x: tf.Tensor, margin: Margin) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-triplet loss and activity for `x = d_pos - d_neg` (any shape)."""
    if margin == "soft":
        return tf.nn.softplus(x), x > 0.0
    term = tf.nn.relu(x + margin)
    return term, term > 0.0


def _masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of `values` where `mask`; 0 (not NaN) when the mask is empty.

    `tf.where` rather than multiplication, so an inf/NaN in a masked-out entry can
    neither leak into the value nor into the gradient.
    """
    mask_f = tf.cast(mask, tf.float32)
    total = tf.reduce_sum(tf.where(mask, values, tf.zeros_like(values)))
    return total / tf.maximum(tf.reduce_sum(mask_f), 1.0)


def _fraction(flags: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Fraction of `mask` entries where `flags` is true; 0 for an empty mask."""
    return _masked_mean(tf.cast(flags, tf.float32), mask)


def _label_masks(labels: tf.Tensor, batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(B, B)` positive (same label, not self) and negative (other label) masks."""
    same = tf.equal(labels[:, None], labels[None, :])
    not_self = tf.logical_not(tf.eye(batch, dtype=tf.bool))
    return tf.logical_and(same, not_self), tf.logical_not(same)


def _common_stats(dists: tf.Tensor, positives: tf.Tensor, embeddings: tf.Tensor,
                  batch: tf.Tensor) -> Stats:
    """Stats that do not depend on mining: in-batch top-1 and mean embedding norm.

    top1 is taken over anchors that have at least one positive (an anchor whose
    label occurs once cannot be re-identified, so it would only measure the batch
    composition); ties go to the lower index, like `argmin`.
    """
    self_mask = tf.eye(batch, dtype=tf.bool)
    others = tf.where(self_mask, tf.fill(tf.shape(dists), float("inf")), dists)
    nearest = tf.argmin(others, axis=1, output_type=tf.int32)  # (B,)
    hit = tf.gather(positives, nearest, axis=1, batch_dims=1)  # positives[a, nearest[a]]
    has_pos = tf.reduce_any(positives, axis=1)
    norms = tf.norm(embeddings, axis=1)
    return {"top1": _fraction(hit, has_pos),
            "embedding_norm": _masked_mean(norms, tf.ones_like(norms, dtype=tf.bool))}


def _prepare(labels, embeddings, metric: str):
    """Shared first steps: validated inputs, distances and label masks."""
    check_metric(metric)
    labels = _as_labels(labels)
    embeddings = _as_embeddings(embeddings)
    batch = tf.shape(embeddings)[0]
    dists = pairwise_distances(embeddings, metric)
    positives, negatives = _label_masks(labels, batch)
    return embeddings, batch, dists, positives, negatives


def _big(dists: tf.Tensor) -> tf.Tensor:
    """A finite stand-in for "+inf" when taking a masked minimum over distances.

    Finite (and gradient-free), so that masked-out branches never produce inf - inf.
    """
    return tf.stop_gradient(tf.reduce_max(dists) + 1.0)


# --------------------------------------------------------------------------- losses
def batch_hard_triplet_loss(labels, embeddings, *, margin: Margin = "soft",
                            metric: str = "euclidean") -> tuple[tf.Tensor, Stats]:
    """Batch-hard triplet loss (Hermans et al. 2017), the default.

    For each anchor `a` the farthest positive and the closest negative in the batch
    form one triplet; the loss is the mean of their terms over *valid* anchors, those
    with at least one positive and one negative. With no valid anchor the loss is 0.

    Args:
      labels: `(B,)` or `(B, 1)` labels (any dtype supporting equality; int ids).
      embeddings: `(B, D)` float embeddings (any float dtype; computed in float32).
      margin: "soft" or a non-negative number (see the module docstring).
      metric: one of `METRICS`.

    Returns:
      `(loss, stats)`: loss is a float32 scalar; stats maps `STAT_NAMES` to float32
      scalars: active_fraction over valid anchors, mean_d_pos / mean_d_neg of the
      mined (hardest) distances over valid anchors, top1, embedding_norm.

    Raises:
      ValueError: bad margin, metric, or input rank.
    """
    margin = check_margin(margin)
    embeddings, batch, dists, positives, negatives = _prepare(labels, embeddings, metric)
    zeros = tf.zeros_like(dists)
    # Distances are >= 0, so 0 is a neutral filler for the maximum over positives.
    d_pos = tf.reduce_max(tf.where(positives, dists, zeros), axis=1)  # (B,)
    d_neg = tf.reduce_min(tf.where(negatives, dists, tf.fill(tf.shape(dists), _big(dists))),
                          axis=1)  # (B,)
    valid = tf.logical_and(tf.reduce_any(positives, axis=1), tf.reduce_any(negatives, axis=1))
    term, active = _term(d_pos - d_neg, margin)
    stats = {"active_fraction": _fraction(active, valid),
             "mean_d_pos": _masked_mean(d_pos, valid),
             "mean_d_neg": _masked_mean(d_neg, valid)}
    stats.update(_common_stats(dists, positives, embeddings, batch))
    return _masked_mean(term, valid), stats


def batch_all_triplet_loss(labels, embeddings, *, margin: Margin = "soft",
                           metric: str = "euclidean") -> tuple[tf.Tensor, Stats]:
    """Batch-all triplet loss: every valid `(a, p, n)` triplet of the batch.

    Averaging (the choice made here): with a numeric margin the sum of terms is
    divided by the number of *non-zero* terms, the "BA!=0" variant that Hermans et
    al. found to train far better than the plain mean (which easy triplets drown
    out); with the soft margin every term is > 0, so this is the mean over all valid
    triplets. With no valid (or no active) triplet the loss is 0.
    Memory: a `(B, B, B)` float32 tensor.

    Args:
      labels: `(B,)` or `(B, 1)` labels.
      embeddings: `(B, D)` float embeddings (computed in float32).
      margin: "soft" or a non-negative number.
      metric: one of `METRICS`.

    Returns:
      `(loss, stats)`: active_fraction, mean_d_pos and mean_d_neg are over all valid
      triplets; plus top1 and embedding_norm.

    Raises:
      ValueError: bad margin, metric, or input rank.
    """
    margin = check_margin(margin)
    embeddings, batch, dists, positives, negatives = _prepare(labels, embeddings, metric)
    # Index order [a, p, n].
    valid = tf.logical_and(positives[:, :, None], negatives[:, None, :])  # (B, B, B)
    d_pos = tf.broadcast_to(dists[:, :, None], tf.shape(valid))
    d_neg = tf.broadcast_to(dists[:, None, :], tf.shape(valid))
    term, active = _term(d_pos - d_neg, margin)
    denominator = valid if margin == "soft" else tf.logical_and(valid, active)
    stats = {"active_fraction": _fraction(active, valid),
             "mean_d_pos": _masked_mean(d_pos, valid),
             "mean_d_neg": _masked_mean(d_neg, valid)}
    stats.update(_common_stats(dists, positives, embeddings, batch))
    return _masked_mean(term, denominator), stats


def semi_hard_triplet_loss(labels, embeddings, *, margin: Margin = "soft",
                           metric: str = "euclidean") -> tuple[tf.Tensor, Stats]:
    """Semi-hard triplet loss (Schroff et al. 2015, as in tfa's TripletSemiHardLoss).

    Every `(a, p)` positive pair forms one triplet. Its negative is the closest
    negative that is strictly farther from `a` than `p` is; when no negative is that
    far, the farthest negative of `a` is used (tfa's rule). The loss is the mean of
    the terms over valid pairs, those whose anchor has at least one negative; 0 when
    there is none.
    Memory: a `(B, B, B)` boolean mask and float32 tensor.

    Args:
      labels: `(B,)` or `(B, 1)` labels.
      embeddings: `(B, D)` float embeddings (computed in float32).
      margin: "soft" or a non-negative number.
      metric: one of `METRICS`.

    Returns:
      `(loss, stats)`: active_fraction, mean_d_pos and mean_d_neg (the chosen
      negative) are over valid pairs; plus top1 and embedding_norm.

    Raises:
      ValueError: bad margin, metric, or input rank.
    """
    margin = check_margin(margin)
    embeddings, batch, dists, positives, negatives = _prepare(labels, embeddings, metric)
    # Index order [a, p, n]: negatives of a farther than d(a, p).
    d_an = tf.broadcast_to(dists[:, None, :], [batch, batch, batch])
    farther = tf.logical_and(negatives[:, None, :], d_an > dists[:, :, None])
    big = tf.fill(tf.shape(d_an), _big(dists))
    semi_hard = tf.reduce_min(tf.where(farther, d_an, big), axis=2)  # (B, B)
    farthest = tf.reduce_max(tf.where(negatives, dists, tf.zeros_like(dists)),
                             axis=1, keepdims=True)  # (B, 1)
    d_neg = tf.where(tf.reduce_any(farther, axis=2), semi_hard,
                     tf.broadcast_to(farthest, tf.shape(semi_hard)))  # (B, B)
    valid = tf.logical_and(positives, tf.reduce_any(negatives, axis=1, keepdims=True))
    term, active = _term(dists - d_neg, margin)
    stats = {"active_fraction": _fraction(active, valid),
             "mean_d_pos": _masked_mean(dists, valid),
             "mean_d_neg": _masked_mean(d_neg, valid)}
    stats.update(_common_stats(dists, positives, embeddings, batch))
    return _masked_mean(term, valid), stats


LOSSES: dict[str, LossFn] = {
    "batch_hard": batch_hard_triplet_loss,
    "batch_all": batch_all_triplet_loss,
    "semi_hard": semi_hard_triplet_loss,
}


def get_loss(name: str) -> LossFn:
    """The pure loss function for a mining name.

    Args:
      name: one of `MINING` ("batch_hard", "batch_all", "semi_hard").

    Returns:
      A function `(labels, embeddings, *, margin, metric) -> (loss, stats)`.

    Raises:
      ValueError: naming the bad value and listing the valid ones.
    """
    return LOSSES[check_mining(name)]


def triplet_loss(labels, embeddings, *, mining: str = "batch_hard", margin: Margin = "soft",
                 metric: str = "euclidean") -> tuple[tf.Tensor, Stats]:
    """Triplet loss with the chosen mining, margin and distance.

    Args:
      labels: `(B,)` or `(B, 1)` labels (int ids; equal labels = same identity).
      embeddings: `(B, D)` float embeddings; float16/bfloat16 are cast to float32.
      mining: "batch_hard" (default), "batch_all" or "semi_hard".
      margin: "soft" (softplus) or a non-negative number (hinge).
      metric: "euclidean", "sqeuclidean" or "cityblock".

    Returns:
      `(loss, stats)`: a float32 scalar and a dict of float32 scalars with keys
      `STAT_NAMES` (see the mining functions for what each averages over).

    Raises:
      ValueError: bad mining, margin, metric or input rank.
    """
    return get_loss(mining)(labels, embeddings, margin=margin, metric=metric)


# --------------------------------------------------------------------------- Keras
@keras.saving.register_keras_serializable(package="ish_tf")
class TripletLoss(keras.losses.Loss):
    """Keras wrapper of `triplet_loss`: `model.compile(loss=TripletLoss())`.

    `y_true` is the `(B,)` or `(B, 1)` label vector, `y_pred` the `(B, D)` embedding.
    The loss is a property of the whole batch, so `call` returns a scalar (Keras
    passes scalars through its reduction unchanged). `__call__` is overridden so
    that labels keep their integer dtype (the base class would cast them to float32,
    which merges ids above 2**24) and the embeddings are always read as float32.
    Per-sample weights have no meaning for a batch-level loss and are rejected.

    Args:
      mining: "batch_hard" (default), "batch_all" or "semi_hard".
      margin: "soft" (default) or a non-negative number (a numeric string is fine).
      metric: "euclidean" (default), "sqeuclidean" or "cityblock".
      name: name of the loss (and its name scope).

    Raises:
      ValueError: at construction, for a bad mining, margin or metric.
    """

    def __init__(self, mining: str = "batch_hard", margin: Margin = "soft",
                 metric: str = "euclidean", name: str = "triplet_loss", **kwargs):
        # `reduction`/`dtype` may come back from a config written by the base class;
        # neither changes anything for a float32 scalar loss.
        kwargs.pop("reduction", None)
        kwargs.pop("dtype", None)
        if kwargs:
            raise ValueError(f"TripletLoss got unexpected arguments {sorted(kwargs)}")
        super().__init__(name=name, reduction="sum_over_batch_size", dtype="float32")
        self.mining = check_mining(mining)
        self.margin = check_margin(margin)
        self.metric = check_metric(metric)

    def call(self, y_true, y_pred) -> tf.Tensor:
        """Scalar loss of the batch.

        Args:
          y_true: `(B,)` or `(B, 1)` labels.
          y_pred: `(B, D)` embeddings.

        Returns:
          float32 scalar.
        """
        loss, _ = triplet_loss(y_true, y_pred, mining=self.mining, margin=self.margin,
                               metric=self.metric)
        return loss

    def __call__(self, y_true, y_pred, sample_weight=None) -> tf.Tensor:
        """Scalar loss, scaled by 1/replicas under a multi-replica tf.distribute strategy.

        Raises:
          ValueError: when `sample_weight` is given.
        """
        if sample_weight is not None:
            raise ValueError("TripletLoss is a batch-level loss and does not accept "
                             "sample_weight; drop the weights from the dataset or the fit call")
        with tf.name_scope(self.name):
            loss = self.call(y_true, y_pred)
            # Keras scales per-sample losses itself; a scalar bypasses that, so do it here
            # to keep gradients summed over replicas equal to a single-replica batch.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            if replicas > 1:
                loss = loss / float(replicas)
            return loss

    def get_config(self) -> dict:
        """Mining, margin, metric and name; enough for `from_config`."""
        return {"name": self.name, "mining": self.mining, "margin": self.margin,
                "metric": self.metric}

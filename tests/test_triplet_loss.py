"""Triplet losses: NumPy reference on random batches, hand cases, gradients, XLA, Keras."""

from __future__ import annotations

import itertools
import math
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from ish_tf.losses import triplet as T

EPS = 1e-12
MARGINS = ("soft", 0.2)


# --------------------------------------------------------------------------- reference
def ref_distances(emb: np.ndarray, metric: str) -> np.ndarray:
    """Obviously-correct float64 loops."""
    emb = emb.astype(np.float64)
    n = len(emb)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            diff = emb[i] - emb[j]
            if metric == "cityblock":
                out[i, j] = np.abs(diff).sum()
            elif metric == "sqeuclidean":
                out[i, j] = (diff ** 2).sum()
            else:
                out[i, j] = math.sqrt(max((diff ** 2).sum(), 0.0) + EPS)
    return out


def ref_term(x: float, margin) -> tuple[float, bool]:
    if margin == "soft":
        return float(np.logaddexp(0.0, x)), x > 0
    value = max(x + margin, 0.0)
    return value, value > 0


def ref_loss(labels, emb, mining, margin, metric):
    """Loss and stats by enumerating anchors, pairs and triplets one at a time."""
    d = ref_distances(emb, metric)
    n = len(labels)
    pos = lambda a: [p for p in range(n) if p != a and labels[p] == labels[a]]  # noqa: E731
    neg = lambda a: [q for q in range(n) if labels[q] != labels[a]]  # noqa: E731
    terms, actives, dps, dns, counted = [], [], [], [], []
    for a in range(n):
        if not pos(a) or not neg(a):
            continue
        if mining == "batch_hard":
            triplets = [(max(d[a, p] for p in pos(a)), min(d[a, q] for q in neg(a)))]
        elif mining == "batch_all":
            triplets = [(d[a, p], d[a, q]) for p in pos(a) for q in neg(a)]
        else:  # semi_hard
            triplets = []
            for p in pos(a):
                farther = [d[a, q] for q in neg(a) if d[a, q] > d[a, p]]
                fallback = max(d[a, q] for q in neg(a))  # no semi-hard one: farthest
                triplets.append((d[a, p], min(farther) if farther else fallback))
        for dp, dn in triplets:
            term, active = ref_term(dp - dn, margin)
            terms.append(term)
            actives.append(active)
            dps.append(dp)
            dns.append(dn)
    if mining == "batch_all" and margin != "soft":
        counted = [t for t in terms if t > 0]
        loss = sum(counted) / len(counted) if counted else 0.0
    else:
        loss = sum(terms) / len(terms) if terms else 0.0
    hits = []
    for a in range(n):
        if pos(a):
            others = [(d[a, j], j) for j in range(n) if j != a]
            hits.append(labels[min(others)[1]] == labels[a])
    mean = lambda v: float(np.mean(v)) if len(v) else 0.0  # noqa: E731
    stats = {"active_fraction": mean(actives), "mean_d_pos": mean(dps), "mean_d_neg": mean(dns),
             "top1": mean(hits),
             "embedding_norm": mean(np.linalg.norm(emb.astype(np.float64), axis=1))}
    return loss, stats


def random_batch(rng, n=10, dim=5, classes=4):
    """Labels with repeats and (usually) a singleton, unit-scale embeddings."""
    labels = rng.integers(0, classes, size=n)
    labels[-1] = 99  # always one anchor without positives
    return labels, rng.normal(size=(n, dim)).astype(np.float32)


def as_floats(stats):
    return {k: float(v) for k, v in stats.items()}


# --------------------------------------------------------------------------- value tests
@pytest.mark.parametrize("metric", T.METRICS)
def test_pairwise_distances_match_reference(metric):
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(7, 6)).astype(np.float32)
    got = T.pairwise_distances(emb, metric).numpy()
    assert got.shape == (7, 7) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_distances(emb, metric), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mining,margin,metric",
                         list(itertools.product(T.MINING, MARGINS, T.METRICS)))
def test_matches_numpy_reference(mining, margin, metric):
    rng = np.random.default_rng(zlib.crc32(f"{mining}/{margin}/{metric}".encode()))
    for _ in range(2):
        labels, emb = random_batch(rng)
        loss, stats = T.triplet_loss(labels, emb, mining=mining, margin=margin, metric=metric)
        want_loss, want_stats = ref_loss(labels, emb, mining, margin, metric)
        assert loss.dtype == tf.float32 and loss.shape == ()
        np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-5)
        got = as_floats(stats)
        assert set(got) == set(T.STAT_NAMES)
        for name in T.STAT_NAMES:
            np.testing.assert_allclose(got[name], want_stats[name], rtol=1e-5, atol=1e-5,
                                       err_msg=name)


def test_soft_margin_hand_case_all_minings():
    # Anchor (0,0) and positive (1,0) are 1 apart; the negative (0.5, sqrt(3.75)) is 2
    # from both, so every mining sees only triplets with d_pos - d_neg = -1:
    # loss = ln(1 + e^-1) = 0.313262; none active (d_pos < d_neg).
    emb = np.array([[0, 0], [1, 0], [0.5, math.sqrt(3.75)]], np.float32)
    labels = np.array([5, 5, 8])
    for mining in T.MINING:
        loss, stats = T.triplet_loss(labels, emb, mining=mining, margin="soft")
        assert float(loss) == pytest.approx(math.log1p(math.exp(-1)), abs=1e-5)
        assert float(loss) == pytest.approx(0.3133, abs=1e-4)
        assert float(stats["active_fraction"]) == 0.0
        assert float(stats["mean_d_pos"]) == pytest.approx(1.0, abs=1e-5)
        assert float(stats["mean_d_neg"]) == pytest.approx(2.0, abs=1e-5)


def test_numeric_margin_hand_case_line():
    # Points 0, 1, 3, 7 on a line, labels 0, 0, 1, 1, margin 1 (module docstring).
    emb = np.array([[0.0], [1.0], [3.0], [7.0]], np.float32)
    labels = np.array([0, 0, 1, 1], np.int64)
    loss, stats = T.batch_hard_triplet_loss(labels, emb, margin=1.0)
    # Anchors' (d_pos, d_neg): (1, 3) (1, 2) (4, 2) (4, 6) -> terms 0, 0, 3, 0.
    assert float(loss) == pytest.approx(0.75, abs=1e-5)
    assert as_floats(stats) == pytest.approx({"active_fraction": 0.25, "mean_d_pos": 2.5,
                                              "mean_d_neg": 3.25, "top1": 0.75,
                                              "embedding_norm": 2.75}, abs=1e-5)
    # Batch-all: 8 valid triplets; only (3, 7, 0) -> 4-3+1 = 2 and (3, 7, 1) -> 3 are
    # non-zero, and "BA!=0" averages over them: 5 / 2.
    loss, stats = T.batch_all_triplet_loss(labels, emb, margin=1.0)
    assert float(loss) == pytest.approx(2.5, abs=1e-5)
    assert float(stats["active_fraction"]) == pytest.approx(0.25)
    assert float(stats["mean_d_neg"]) == pytest.approx(4.5, abs=1e-5)  # (3+7+2+6+3+2+7+6)/8
    # Semi-hard: pairs (0,1): neg 3 -> 0; (1,0): neg at 2 -> 1-2+1 = 0 (not active);
    # (3,7): no negative beyond 4 -> farthest (0, at 3) -> 2; (7,3): neg at 6 -> 0.
    loss, stats = T.semi_hard_triplet_loss(labels, emb, margin=1.0)
    assert float(loss) == pytest.approx(0.5, abs=1e-5)
    assert float(stats["mean_d_neg"]) == pytest.approx(3.5, abs=1e-5)  # (3+2+3+6)/4
    assert float(stats["active_fraction"]) == pytest.approx(0.25)


def test_semi_hard_needs_a_strictly_farther_negative():
    # Line points 0, 1 (label 0) and -1, 3 (label 1), cityblock, margin 0.5.
    # (0, 1): d_ap = 1; negative -1 ties at 1 so is not "farther"; 3 is -> x = -2 -> 0.
    # (1, 0): negatives at 2, 2 -> x = -1 -> 0.
    # (-1, 3): d_ap = 4, negatives at 1, 2, none farther -> farthest 2 -> x = 2 -> 2.5.
    # (3, -1): d_ap = 4, negatives at 3, 2 -> farthest 3 -> x = 1 -> 1.5.  Mean 1.0.
    emb = np.array([[0.0], [1.0], [-1.0], [3.0]], np.float32)
    loss, stats = T.semi_hard_triplet_loss([0, 0, 1, 1], emb, margin=0.5, metric="cityblock")
    assert float(loss) == pytest.approx(1.0, abs=1e-6)
    assert float(stats["mean_d_neg"]) == pytest.approx((3 + 2 + 2 + 3) / 4, abs=1e-6)
    assert float(stats["active_fraction"]) == pytest.approx(0.5)


@pytest.mark.parametrize("labels", [[0, 1, 2, 3], [4, 4, 4, 4], [7]])
def test_no_valid_anchor_gives_zero_without_nan(labels):
    emb = tf.constant(np.random.default_rng(0).normal(size=(len(labels), 3)), tf.float32)
    for mining, margin in itertools.product(T.MINING, MARGINS):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            loss, stats = T.triplet_loss(labels, emb, mining=mining, margin=margin)
        grad = tape.gradient(loss, emb)
        assert float(loss) == 0.0
        assert np.all(np.isfinite(list(as_floats(stats).values())))
        assert np.all(grad.numpy() == 0.0)
        assert float(stats["active_fraction"]) == 0.0
        # Re-identification is trivially right when every sample shares one label.
        assert float(stats["top1"]) == (1.0 if labels == [4, 4, 4, 4] else 0.0)


@pytest.mark.parametrize("metric", T.METRICS)
def test_identical_embeddings_have_finite_gradients(metric):
    emb = tf.constant(np.ones((6, 4)), tf.float32)
    labels = [0, 0, 1, 1, 2, 2]
    for mining, margin in itertools.product(T.MINING, MARGINS):
        with tf.GradientTape() as tape:
            tape.watch(emb)
            loss, stats = T.triplet_loss(labels, emb, mining=mining, margin=margin,
                                         metric=metric)
        grad = tape.gradient(loss, emb).numpy()
        assert np.all(np.isfinite(grad)), (mining, margin, metric)
        # All distances equal: soft -> ln 2, hinge -> the margin itself. A tie is not
        # an ordering violation (soft: inactive), but a hinge term of 0.2 is active.
        want = math.log(2.0) if margin == "soft" else margin
        assert float(loss) == pytest.approx(want, abs=1e-5)
        assert float(stats["active_fraction"]) == (0.0 if margin == "soft" else 1.0)


def test_gradient_is_finite_and_nonzero_on_a_random_batch():
    labels, emb = random_batch(np.random.default_rng(3))
    emb = tf.constant(emb)
    for mining in T.MINING:
        with tf.GradientTape() as tape:
            tape.watch(emb)
            loss, _ = T.triplet_loss(labels, emb, mining=mining)
        grad = tape.gradient(loss, emb).numpy()
        assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


def test_half_precision_inputs_are_computed_in_float32():
    labels, emb = random_batch(np.random.default_rng(4))
    for dtype in (tf.float16, tf.bfloat16):
        low = tf.constant(emb, dtype)
        loss, stats = T.triplet_loss(labels, low, mining="batch_all")
        assert loss.dtype == tf.float32 and stats["top1"].dtype == tf.float32
        want, _ = ref_loss(labels, tf.cast(low, tf.float32).numpy(), "batch_all", "soft",
                           "euclidean")
        np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors, registry
def test_bad_names_raise_clear_errors():
    emb = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match=r"'hardest'.*batch_hard.*batch_all.*semi_hard"):
        T.triplet_loss([0, 1], emb, mining="hardest")
    with pytest.raises(ValueError, match=r"'cosine'.*euclidean.*sqeuclidean.*cityblock"):
        T.triplet_loss([0, 1], emb, metric="cosine")
    with pytest.raises(ValueError, match="'l2'"):
        T.pairwise_distances(emb, "l2")
    for bad in ("hard", -0.1, float("nan"), True, None):
        with pytest.raises(ValueError, match="soft"):
            T.triplet_loss([0, 1], emb, margin=bad)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        T.pairwise_distances(np.zeros((2, 2, 2), np.float32))
    for kwargs in ({"mining": "x"}, {"metric": "x"}, {"margin": "x"}):
        with pytest.raises(ValueError, match="'x'"):
            T.TripletLoss(**kwargs)


def test_registry_and_margin_strings():
    assert set(T.LOSSES) == set(T.MINING)
    assert T.get_loss("semi_hard") is T.semi_hard_triplet_loss
    with pytest.raises(ValueError, match="'nope'"):
        T.get_loss("nope")
    assert T.check_margin("0.3") == 0.3 and T.check_margin(1) == 1.0
    assert T.check_margin("soft") == "soft"


# --------------------------------------------------------------------------- graph, XLA
@pytest.mark.parametrize("mining", T.MINING)
def test_jit_compile_with_dynamic_batch_matches_eager(mining):
    @tf.function(jit_compile=True, input_signature=[tf.TensorSpec([None], tf.int32),
                                                    tf.TensorSpec([None, 5], tf.float32)])
    def compiled(labels, emb):
        loss, stats = T.triplet_loss(labels, emb, mining=mining, margin=0.2)
        return loss, stats

    rng = np.random.default_rng(5)
    for n in (6, 11):  # two batch sizes through one trace
        labels, emb = random_batch(rng, n=n)
        labels = labels.astype(np.int32)
        got_loss, got_stats = compiled(labels, emb)
        want_loss, want_stats = T.triplet_loss(labels, emb, mining=mining, margin=0.2)
        np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-5, atol=1e-6)
        for name in T.STAT_NAMES:
            np.testing.assert_allclose(float(got_stats[name]), float(want_stats[name]),
                                       rtol=1e-5, atol=1e-6, err_msg=name)
    assert len(compiled.get_concrete_function().structured_outputs) == 2


# --------------------------------------------------------------------------- Keras wrapper
def test_config_round_trip_and_serialization():
    loss = T.TripletLoss(mining="semi_hard", margin="0.3", metric="cityblock", name="tl")
    config = loss.get_config()
    assert config == {"name": "tl", "mining": "semi_hard", "margin": 0.3, "metric": "cityblock"}
    again = T.TripletLoss.from_config(config)
    assert again.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, T.TripletLoss) and restored.get_config() == config
    assert keras.saving.get_registered_name(T.TripletLoss) == "ish_tf>TripletLoss"


def test_keras_loss_keeps_large_integer_labels_apart():
    # 2**24 and 2**24 + 1 are the same float32; cast to float they would be one identity.
    emb = np.array([[0.0], [1.0], [3.0], [7.0]], np.float32)
    big = np.array([2**24, 2**24, 2**24 + 1, 2**24 + 1], np.int64)[:, None]  # Keras (B, 1)
    loss_fn = T.TripletLoss(margin=1.0)
    assert float(loss_fn(big, emb)) == pytest.approx(0.75, abs=1e-5)
    with pytest.raises(ValueError, match="sample_weight"):
        loss_fn(big, emb, sample_weight=np.ones(4, np.float32))


def test_compile_fit_and_reload(tmp_path):
    rng = np.random.default_rng(6)
    centers = rng.normal(size=(4, 6)).astype(np.float32) * 3
    labels = np.repeat(np.arange(4), 8)
    x = centers[labels] + rng.normal(size=(32, 6)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss=T.TripletLoss(margin=0.5))
    # Batches of 16 from a shuffled set: labels repeat within every batch.
    history = model.fit(x, labels, batch_size=16, epochs=4, verbose=0, shuffle=True)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.loss, T.TripletLoss)
    assert loaded.loss.get_config()["margin"] == 0.5
    np.testing.assert_allclose(loaded.predict(x[:4], verbose=0), model.predict(x[:4], verbose=0),
                               rtol=1e-6)

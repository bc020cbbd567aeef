"""Tests of the tf.data readers: plain shuffled reader and the P×K triplet reader."""

from __future__ import annotations

import os
import types

import numpy as np
import pytest
import tensorflow as tf
from test_records import write_tiny_dataset

from ish_tf import cli
from ish_tf.cli import train as train_cli
from ish_tf.data import framing, pipeline, shards
from ish_tf.data.records import RecordsError

GENES = {"A": 4, "B": 4, "C": 3, "D": 2, "E": 1, "F": 4, "G": 5}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """7 genes (one with a single patch), 3 uncompressed PNG shards of 16x16 patches."""
    out = str(tmp_path_factory.mktemp("records"))
    expected = write_tiny_dataset(out, GENES, num_shards=3)
    return out, expected


def variants(image: np.ndarray) -> list[np.ndarray]:
    """[identity, left-right, up-down, both] of an (H, W, 3) image."""
    return [image, image[:, ::-1], image[::-1], image[::-1, ::-1]]


def which_variant(out: np.ndarray, expected: dict) -> tuple[tuple, int]:
    for key, rec in expected.items():
        for v, img in enumerate(variants(rec["image"].astype(np.float32))):
            if np.array_equal(out, img):
                return key, v
    raise AssertionError("output image matches no record in any flip")


def take(ds: tf.data.Dataset, n: int) -> list:
    return [tf.nest.map_structure(lambda t: t.numpy(), x) for x in ds.take(n)]


def test_list_shards_uses_the_index_and_names_the_directory(tiny, tmp_path):
    out, _ = tiny
    files = pipeline.list_shards(out, "train")
    assert [os.path.basename(f) for f in files] == [shards.shard_name("train", k, 3)
                                                   for k in range(3)]
    with pytest.raises(RecordsError, match=f"{out}: split 'test' has no completed shards"):
        pipeline.list_shards(out, "test")
    # A partial file and an unlisted shard-named file are ignored.
    d = str(tmp_path)
    write_tiny_dataset(d, {"A": 2, "B": 2}, num_shards=1)
    open(os.path.join(d, ".train-00000-of-00002.tfrecord.x.tmp"), "wb").close()
    open(os.path.join(d, "train-00001-of-00001.tfrecord"), "wb").close()
    assert [os.path.basename(f) for f in pipeline.list_shards(d, "train")] == [
        "train-00000-of-00001.tfrecord"]


def test_with_keys_reads_every_record_unaugmented(tiny):
    out, expected = tiny
    ds = pipeline.patch_dataset(out, "train", batch_size=4, training=False, with_keys=True)
    seen = 0
    for images, feats in ds:
        assert images.dtype == tf.float32 and images.shape[1:] == (16, 16, 3)
        for i in range(images.shape[0]):
            rec = expected[(int(feats["image_id"][i]), int(feats["patch_index"][i]))]
            np.testing.assert_array_equal(images[i].numpy(), rec["image"].astype(np.float32))
            assert feats["gene_symbol"][i].numpy().decode() == rec["gene_symbol"]
            assert int(feats["gene_index"][i]) == rec["gene_index"]
            assert (int(feats["x"][i]), int(feats["y"][i])) == (rec["x"], rec["y"])
            assert feats["donor_id"][i].numpy().decode() == rec["donor_id"]
            seen += 1
    assert seen == len(expected) == sum(GENES.values())
    assert set(feats) == set(pipeline.KEY_FEATURES)


def test_training_batches_labels_determinism_and_flips(tiny):
    out, expected = tiny
    kw = dict(batch_size=5, training=True, deterministic=True, shuffle_buffer=64)
    a = take(pipeline.patch_dataset(out, "train", seed=1, **kw), 12)
    b = take(pipeline.patch_dataset(out, "train", seed=1, **kw), 12)
    c = take(pipeline.patch_dataset(out, "train", seed=2, **kw), 12)
    for (xa, ya), (xb, yb) in zip(a, b, strict=False):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c, strict=False))
    kinds = set()
    for images, labels in a:
        assert images.shape == (5, 16, 16, 3) and labels.dtype == np.int32
        assert images.min() >= 0 and images.max() <= 255
        for img, label in zip(images, labels, strict=False):
            key, v = which_variant(img, expected)
            assert label == expected[key]["gene_index"]
            kinds.add(v)
    assert kinds == {0, 1, 2, 3}  # 60 draws: every flip combination occurs
    no_flip = take(pipeline.patch_dataset(out, "train", seed=1, flips=False, **kw), 4)
    assert {which_variant(img, expected)[1] for x, _ in no_flip for img in x} == {0}


def test_standardize_gives_zero_mean_unit_std(tiny):
    out, _ = tiny
    ds = pipeline.patch_dataset(out, "train", batch_size=8, training=True, standardize=True,
                                label_key=None)
    images = next(iter(ds)).numpy()
    assert images.shape == (8, 16, 16, 3)
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), 0.0, atol=1e-4)
    np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 1.0, atol=1e-3)


def test_input_context_gives_disjoint_files(tiny):
    out, expected = tiny
    keys = []
    for i in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i,
                                         num_replicas_in_sync=2)
        ds = pipeline.patch_dataset(out, "train", batch_size=4, training=False, with_keys=True,
                                    input_context=ctx)
        got = set()
        for images, feats in ds:
            assert images.shape[0] <= 2  # per-replica batch
            got |= set(zip(feats["image_id"].numpy().tolist(),
                           feats["patch_index"].numpy().tolist(), strict=False))
        keys.append(got)
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert keys[0] | keys[1] == set(expected)
    ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=0)
    with pytest.raises(RecordsError, match="cannot split 3 shard file"):
        pipeline.patch_dataset(out, "train", batch_size=4, training=True, input_context=ctx)


def test_preprocessing_eager_and_in_tf_data_agree(tiny):
    out, _ = tiny
    files = pipeline.list_shards(out, "train")
    serialized = tf.constant([s.numpy() for s in tf.data.TFRecordDataset(files[0]).take(4)])
    bits = pipeline.flip_bits(tf.constant([3, 4], tf.int64), 4)
    eager = pipeline.augment(pipeline.decode_batch(serialized, 16), bits, standardize=True)
    ds = tf.data.Dataset.from_tensors((serialized, bits)).map(
        lambda s, f: pipeline.augment(pipeline.decode_batch(s, 16), f, standardize=True))
    np.testing.assert_array_equal(eager.numpy(), next(iter(ds)).numpy())
    per_record = tf.data.Dataset.from_tensor_slices((serialized, bits)).map(
        lambda s, f: pipeline.augment_image(pipeline.decode_one(s, 16), f, standardize=True),
        num_parallel_calls=2).batch(4)
    np.testing.assert_array_equal(eager.numpy(), next(iter(per_record)).numpy())
    # flip_bits is a pure function of its seed.
    np.testing.assert_array_equal(bits, pipeline.flip_bits(tf.constant([3, 4], tf.int64), 4))
    # The flips are the plain numpy flips.
    plain = pipeline.decode_batch(serialized, 16).numpy().astype(np.float32)
    flipped = pipeline.augment(plain, tf.constant([[True, False], [False, True],
                                                   [True, True], [False, False]])).numpy()
    for i, v in enumerate((1, 2, 3, 0)):
        np.testing.assert_array_equal(flipped[i], variants(plain[i])[v])


def test_pk_batches_structure_and_epochs(tiny):
    out, expected = tiny
    P, K = 3, 4
    ds = pipeline.pk_dataset(out, "train", P=P, K=K, seed=5, flips=False)
    assert ds.element_spec[0].shape == (P * K, 16, 16, 3)
    batches = take(ds, 4)
    gene_of_label = {rec["gene_index"]: rec["gene_symbol"] for rec in expected.values()}
    epoch_genes = []
    for images, labels in batches:
        groups = labels.reshape(P, K)
        assert (groups == groups[:, :1]).all()  # K adjacent records per gene
        assert len(set(groups[:, 0])) == P  # P distinct genes
        for img, label in zip(images, labels, strict=False):
            key, v = which_variant(img, expected)
            assert v == 0 and expected[key]["gene_index"] == label
        for g in groups[:, 0]:
            imgs = images[labels == g]
            n = GENES[gene_of_label[g]]
            distinct = {which_variant(i, expected)[0] for i in imgs}
            # Without replacement when the gene has >= K patches, else each patch reused.
            assert len(distinct) == min(n, K)
        epoch_genes.append(list(groups[:, 0]))
    # 7 genes, P=3: 2 batches per epoch with 6 distinct genes; the next epoch reshuffles.
    assert len(set(epoch_genes[0] + epoch_genes[1])) == 6
    assert len(set(epoch_genes[2] + epoch_genes[3])) == 6
    # Without determinism whole batches may come out of order, but never mix.
    for _, labels in take(pipeline.pk_dataset(out, "train", P=P, K=K, seed=5,
                                              deterministic=False), 20):
        groups = labels.reshape(P, K)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == P
    single = pipeline.PKSampler([1, 5], P=2, K=4, seed=0)
    genes, recs, _ = single.batch(0)
    assert sorted(recs[genes == 0].tolist()) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="only 7 genes"):
        pipeline.pk_dataset(out, "train", P=8, K=2)


def test_pk_deterministic_resume_and_flips_match_eager(tiny):
    out, expected = tiny
    a = take(pipeline.pk_dataset(out, "train", P=2, K=3, seed=7), 5)
    b = take(pipeline.pk_dataset(out, "train", P=2, K=3, seed=7), 5)
    c = take(pipeline.pk_dataset(out, "train", P=2, K=3, seed=8), 5)
    late = take(pipeline.pk_dataset(out, "train", P=2, K=3, seed=7, start_batch=3), 1)
    for (xa, ya), (xb, yb) in zip(a, b, strict=False):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert any(not np.array_equal(xa, xc) for (xa, _), (xc, _) in zip(a, c, strict=False))
    np.testing.assert_array_equal(late[0][0], a[3][0])
    # Rebuild batch 1 eagerly from the sampler and the original images.
    ext = shards.gene_extents(out, "train")
    genes, recs, bits = pipeline.PKSampler([e.count for e in ext], 2, 3, seed=7).batch(1)
    by_gene = {}
    for rec in sorted(expected.values(), key=lambda r: (r["image_id"], r["patch_index"])):
        by_gene.setdefault(rec["gene_symbol"], []).append(rec["image"])
    want = np.stack([by_gene[ext[g].gene_symbol][r] for g, r in zip(genes, recs, strict=False)])
    want = pipeline.augment(want, tf.constant(bits)).numpy()
    np.testing.assert_array_equal(a[1][0], want)
    assert bits.any() and not bits.all()


def test_pk_input_context_slices_concatenate_to_global_batch(tiny):
    out, _ = tiny
    glob = take(pipeline.pk_dataset(out, "train", P=4, K=2, seed=3), 2)
    # One pipeline feeding two replicas: consecutive elements are the two halves.
    one = tf.distribute.InputContext(num_input_pipelines=1, input_pipeline_id=0,
                                     num_replicas_in_sync=2)
    halves = take(pipeline.pk_dataset(out, "train", P=4, K=2, seed=3, input_context=one), 4)
    # Two pipelines of one replica each.
    per = [take(pipeline.pk_dataset(out, "train", P=4, K=2, seed=3, input_context=ctx), 2)
           for ctx in (tf.distribute.InputContext(2, i, 2) for i in range(2))]
    for t in range(2):
        for parts in ((halves[2 * t], halves[2 * t + 1]), (per[0][t], per[1][t])):
            assert parts[0][0].shape == (4, 16, 16, 3)
            np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), glob[t][0])
            np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), glob[t][1])
    with pytest.raises(ValueError, match="divide over 2 replicas"):
        pipeline.pk_dataset(out, "train", P=3, K=2, input_context=one)


def test_pk_without_sidecar_and_with_gzip(tmp_path):
    out = str(tmp_path / "plain")
    write_tiny_dataset(out, {"A": 3, "B": 2}, num_shards=1)
    os.remove(framing.offsets_path(os.path.join(out, "train-00000-of-00001.tfrecord")))
    images, labels = next(iter(pipeline.pk_dataset(out, "train", P=2, K=2)))
    assert images.shape == (4, 16, 16, 3) and sorted(set(labels.numpy())) == [0, 1]
    gz = str(tmp_path / "gz")
    write_tiny_dataset(gz, {"A": 3, "B": 2}, num_shards=1, compression="GZIP")
    assert os.listdir(gz).count("train-00000-of-00001.tfrecord.gz") == 1
    with pytest.raises(RecordsError, match="GZIP shards"):
        pipeline.pk_dataset(gz, "train", P=2, K=2)
    ds = pipeline.patch_dataset(gz, "train", batch_size=5, training=False)
    assert sum(int(x.shape[0]) for x, _ in ds) == 5


def test_pipeline_config_from_flags():
    from absl import flags as absl_flags

    flag_values = absl_flags.FlagValues()
    cli.define_common(flag_values)
    train_cli.define_pipeline(flag_values)
    assert flag_values["shuffle_buffer"].default == 4096
    assert flag_values["standardize"].default is False
    fv = types.SimpleNamespace(standardize=True, shuffle_buffer=10000, cycle_length=2,
                               small_run=True)
    cfg = train_cli.pipeline_config(fv)
    assert cfg == pipeline.PipelineConfig(flips=True, standardize=True, shuffle_buffer=256,
                                          deterministic=False, cycle_length=2)
    fv.flips, fv.deterministic, fv.small_run = False, True, False
    cfg = train_cli.pipeline_config(fv)
    assert cfg.reader_kwargs() == {"flips": False, "standardize": True, "shuffle_buffer": 10000,
                                   "deterministic": True, "cycle_length": 2}
    assert cfg.pk_kwargs() == {"flips": False, "standardize": True, "deterministic": True}


def test_pk_iterator_checkpoint_restores_position(tiny, tmp_path):
    out, _ = tiny
    ds = pipeline.pk_dataset(out, "train", P=2, K=2, seed=4)
    it = iter(ds)
    next(it)
    ckpt = tf.train.Checkpoint(data=it)
    path = ckpt.save(str(tmp_path / "ckpt"))
    after = [next(it)[0].numpy() for _ in range(2)]
    it2 = iter(ds)
    tf.train.Checkpoint(data=it2).restore(path)
    for want in after:
        np.testing.assert_array_equal(next(it2)[0].numpy(), want)

"""Tests of input kinds in the record schema, `write_record_set` and the readers:
3-channel JPEG/PNG records as before, raw multi-channel (uint8/uint16) images, and
float vectors with no image."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from ish_tf.data import pipeline, records, shards
from ish_tf.data.inputs import InputSpec
from ish_tf.data.record_sets import write_record_set
from ish_tf.data.records import RecordsError

IDENTITIES = ("ACTB", "GFAP", "PVALB", "SST")
N_PER_IDENTITY = 4


def image_examples(channels: int, dtype: str, size: int = 8, seed: int = 0):
    """{split: examples} and {image_id: (identity, image)} for a tiny image set."""
    rng = np.random.default_rng(seed)
    high = 256 if dtype == "uint8" else 65536
    examples, expected = [], {}
    for g in IDENTITIES:
        for r in range(N_PER_IDENTITY):
            image_id = len(expected) + 100
            image = rng.integers(0, high, (size, size, channels)).astype(dtype)
            examples.append({"identity": g, "group": f"plate{r % 2}", "image_id": image_id,
                             "image": image})
            expected[image_id] = (g, image)
    return {"train": examples}, expected


def vector_examples(dim: int = 7, seed: int = 0):
    rng = np.random.default_rng(seed)
    examples, expected = [], {}
    for g in IDENTITIES:
        for r in range(N_PER_IDENTITY):
            image_id = len(expected)
            vector = rng.normal(size=dim).astype(np.float32)
            examples.append({"identity": g, "group": f"batch{r % 2}", "image_id": image_id,
                             "vector": vector})
            expected[image_id] = (g, vector)
    return {"train": examples}, expected


def test_jpeg_and_png_records_keep_their_bytes():
    # Hashes of the same calls made with the schema before input kinds existed
    # (commit 26acfb9): old and new records must be interchangeable.
    jpeg = records.make_example(
        image_encoded=b"\xff\xd8\xff\xe0 not really a jpeg", image_height=16, image_width=16,
        image_id=1001, gene_symbol="PVALB", gene_index=3, donor_id="H08", donor_index=1,
        x=5, y=7, source_size=32)
    png = records.make_example(
        image_encoded=b"\x89PNG\r\n\x1a\n not really a png", height=8, width=12, image_id=7,
        patch_index=2, gene_symbol="A", gene_index=0, entrez_id=5816, region="V1",
        study="cortex", label=1, vector=[0.5, -1.25, 3.0])
    assert hashlib.sha256(jpeg).hexdigest() == (
        "6e9ddb72ccf20174f5c05bca13387547175e5ecda8a0c0fcd29efb26f93db7ac")
    assert hashlib.sha256(png).hexdigest() == (
        "806fea43f6a8317f2cf67428bf5de68aad2280d15aee7076925db480b087cd2b")
    for key in records.RAW_IMAGE_KEYS:
        assert key.encode() not in jpeg
    # Checking against the set's 3-channel spec does not change the bytes either.
    again = records.make_example(
        input_spec=InputSpec.image(3, 16), image_encoded=b"\xff\xd8\xff\xe0 not really a jpeg",
        image_height=16, image_width=16, image_id=1001, gene_symbol="PVALB", gene_index=3,
        donor_id="H08", donor_index=1, x=5, y=7, source_size=32)
    assert again == jpeg


@pytest.mark.parametrize("dtype", ["uint16", "uint8"])
def test_six_channel_raw_round_trip_through_both_readers(tmp_path, dtype):
    split_examples, expected = image_examples(6, dtype)
    out = str(tmp_path / "rec")
    spec = InputSpec.image(6, 8, dtype=dtype)
    info = write_record_set(out, split_examples, spec, num_shards=2, identity_name="perturbation",
                            group_name="plate")
    assert info.format == "raw" and info.identity_name == "perturbation"
    assert shards.records_input_spec(out) == spec
    assert os.path.exists(os.path.join(out, shards.GENES_NAME))

    raw = next(iter(tf.data.TFRecordDataset(pipeline.list_shards(out, "train")[0])))
    feats = records.parse_example(raw)
    assert feats["image/format"].numpy() == b"raw"
    assert feats["image/channels"].numpy() == 6 and feats["image/dtype"].numpy() == dtype.encode()

    ds = pipeline.patch_dataset(out, "train", batch_size=5, training=False, with_keys=True)
    assert ds.element_spec[0].shape.as_list() == [None, 8, 8, 6]
    seen = 0
    for images, keys in ds:
        for image, image_id, g in zip(images.numpy(), keys["image_id"].numpy(),
                                      keys[records.IDENTITY_KEY].numpy(), strict=True):
            identity, want = expected[int(image_id)]
            assert g.decode() == identity
            np.testing.assert_array_equal(image, want.astype(np.float32))
            seen += 1
    assert seen == len(expected)

    ds = pipeline.pk_dataset(out, "train", P=2, K=3, flips=False, seed=1)
    assert ds.element_spec[0].shape.as_list() == [6, 8, 8, 6]
    vocab = info.gene_index()
    by_label = {vocab[g]: [im.astype(np.float32) for gg, im in expected.values() if gg == g]
                for g in IDENTITIES}
    images, labels = next(iter(ds))
    labels = labels.numpy()
    assert len(set(labels)) == 2 and all(len(set(labels[i:i + 3])) == 1 for i in (0, 3))
    for image, label in zip(images.numpy(), labels, strict=True):
        assert any(np.array_equal(image, want) for want in by_label[int(label)])


def test_three_channel_arrays_are_stored_as_png_and_read_as_before(tmp_path):
    split_examples, expected = image_examples(3, "uint8")
    out = str(tmp_path / "rec")
    info = write_record_set(out, split_examples, InputSpec.image(3, 8))
    assert info.format == "png"
    raw = next(iter(tf.data.TFRecordDataset(pipeline.list_shards(out, "train")[0])))
    assert records.parse_example(raw)["image/format"].numpy() == b"png"
    images, keys = next(iter(pipeline.patch_dataset(out, "train", batch_size=16, training=False,
                                                    with_keys=True)))
    assert images.shape == (16, 8, 8, 3)
    for image, image_id in zip(images.numpy(), keys["image_id"].numpy(), strict=True):
        np.testing.assert_array_equal(image, expected[int(image_id)][1].astype(np.float32))


def test_vector_set_round_trips_through_both_readers(tmp_path):
    split_examples, expected = vector_examples(dim=7)
    out = str(tmp_path / "rec")
    info = write_record_set(out, split_examples, InputSpec.vector(), num_shards=3,
                            identity_name="cell_type", group_name="batch")
    assert shards.records_input_spec(out) == InputSpec.vector(7)
    assert info.donors == ["batch0", "batch1"] and info.group_name == "batch"

    raw = next(iter(tf.data.TFRecordDataset(pipeline.list_shards(out, "train")[0])))
    assert b"image/encoded" not in raw.numpy()

    ds = pipeline.patch_dataset(out, "train", batch_size=16, training=True, seed=3)
    assert ds.element_spec[0].shape.as_list() == [16, 7]
    vectors, labels = next(iter(ds))
    vocab = info.gene_index()
    for v, label in zip(vectors.numpy(), labels.numpy(), strict=True):
        assert any(np.array_equal(v, want) for g, want in expected.values()
                   if vocab[g] == int(label))

    keyed = pipeline.patch_dataset(out, "train", batch_size=16, training=False, with_keys=True)
    vectors, keys = next(iter(keyed))
    for v, image_id, g, donor in zip(vectors.numpy(), keys["image_id"].numpy(),
                                     keys[records.IDENTITY_KEY].numpy(),
                                     keys[records.GROUP_INDEX_KEY].numpy(), strict=True):
        identity, want = expected[int(image_id)]
        np.testing.assert_array_equal(v, want)
        assert g.decode() == identity and donor == int(image_id) % N_PER_IDENTITY % 2


def test_pk_sampling_over_a_vector_set(tmp_path):
    split_examples, expected = vector_examples(dim=7)
    out = str(tmp_path / "rec")
    info = write_record_set(out, split_examples, InputSpec.vector(7), num_shards=2)
    P, K = 3, 2
    ds = pipeline.pk_dataset(out, "train", P=P, K=K, seed=5)
    assert ds.element_spec[0].shape.as_list() == [P * K, 7]
    symbol = {i: g for g, i in info.gene_index().items()}
    for vectors, labels in ds.take(3):
        labels = labels.numpy()
        groups = [labels[i * K:(i + 1) * K] for i in range(P)]
        assert all(len(set(g)) == 1 for g in groups)
        assert len({int(g[0]) for g in groups}) == P
        for v, label in zip(vectors.numpy(), labels, strict=True):
            assert any(np.array_equal(v, want) for g, want in expected.values()
                       if g == symbol[int(label)])


def test_bad_records_name_the_field(tmp_path):
    spec6 = InputSpec.image(6, 8, dtype="uint16")
    base = {"image_id": 1, "gene_symbol": "A", "gene_index": 0}
    with pytest.raises(RecordsError, match="image/channels.*5 channel.*says 6"):
        records.make_example(input_spec=spec6, image=np.zeros((8, 8, 5), np.uint16), **base)
    with pytest.raises(RecordsError, match="image/height"):
        records.make_example(input_spec=spec6, image=np.zeros((8, 8, 6), np.uint16),
                             image_height=9, **base)
    with pytest.raises(RecordsError, match="image/dtype"):
        records.make_example(input_spec=spec6, image=np.zeros((8, 8, 6), np.uint8), **base)
    with pytest.raises(RecordsError, match="image/channels.*required for a raw image"):
        records.make_example(image_encoded=bytes(8 * 8 * 6 * 2), image_format="raw",
                             image_height=8, image_width=8, image_dtype="uint16", **base)
    with pytest.raises(RecordsError, match="image/encoded.*takes 768"):
        records.make_example(image_encoded=bytes(10), image_format="raw", image_height=8,
                             image_width=8, image_channels=6, image_dtype="uint16", **base)
    with pytest.raises(RecordsError, match="vector.*5 values.*dim 7"):
        records.make_example(input_spec=InputSpec.vector(7), vector=np.zeros(5), **base)
    with pytest.raises(RecordsError, match="vector record holds no image"):
        records.make_example(input_spec=InputSpec.vector(7), vector=np.zeros(7),
                             image_encoded=b"x", **base)
    with pytest.raises(RecordsError, match="missing required.*vector"):
        records.make_example(input_spec=InputSpec.vector(7), **base)
    # Through the writer: the message still names the field, and which record.
    split_examples, _ = image_examples(6, "uint16")
    split_examples["train"][5]["image"] = np.zeros((8, 8, 3), np.uint16)
    with pytest.raises(RecordsError, match="image_id 105.*image/channels"):
        write_record_set(str(tmp_path / "bad"), split_examples, spec6)
    split_examples, _ = vector_examples(dim=7)
    split_examples["train"][2]["vector"] = np.zeros(6)
    with pytest.raises(RecordsError, match="'vector' has 6 values"):
        write_record_set(str(tmp_path / "badv"), split_examples, InputSpec.vector())


def test_vector_records_need_no_image_but_image_sets_still_do():
    ser = records.make_example(vector=[1.0, 2.0], image_id=3, gene_symbol="A", gene_index=0)
    parsed = records.parse_example(ser, kind="vector")
    np.testing.assert_array_equal(parsed["vector"].numpy(), [1.0, 2.0])
    assert parsed["image/encoded"].numpy() == b"" and parsed["source_size"].numpy() == -1
    with pytest.raises(tf.errors.InvalidArgumentError):
        records.parse_example(ser, kind="image")


def test_old_index_without_input_spec_reads_as_three_channel_images(tmp_path):
    out = str(tmp_path / "old")
    split_examples, expected = image_examples(3, "uint8", size=16)
    write_record_set(out, split_examples, InputSpec.image(3, 16))
    # Make the index what older versions wrote: no input spec, no role names.
    path = shards.index_path(out)
    index = json.loads(open(path).read())
    for key in ("input_spec", "identity_name", "group_name"):
        del index["dataset"][key]
    index["dataset"]["format"] = "png"
    with open(path, "w") as f:
        json.dump(index, f)
    assert shards.records_input_spec(out) == InputSpec.image(3, 16, 16)
    info = shards.load_dataset_info(out)
    assert info.input_spec is None and info.spec() == InputSpec.image(3, 16)
    assert (info.identity_name, info.group_name) == ("gene", "donor")
    images, labels = next(iter(pipeline.pk_dataset(out, "train", P=2, K=2, flips=False)))
    assert images.shape == (4, 16, 16, 3) and labels.shape == (4,)
    images, keys = next(iter(pipeline.patch_dataset(out, "train", batch_size=4, training=False,
                                                    with_keys=True)))
    assert images.shape == (4, 16, 16, 3)
    for image, image_id in zip(images.numpy(), keys["image_id"].numpy(), strict=True):
        np.testing.assert_array_equal(image, expected[int(image_id)][1].astype(np.float32))

"""Tests of the TFRecord schema, the sharded writer, the index and the splits."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ish_tf.data import framing, records, shards
from ish_tf.data.records import RecordsError


def encode(image: np.ndarray, fmt: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG" if fmt == "png" else "JPEG", quality=90)
    return buf.getvalue()


def write_tiny_dataset(out: str, genes: dict[str, int], num_shards: int = 2, size: int = 16,
                       split: str = "train", compression: str | None = None, seed: int = 0,
                       fmt: str = "png", fail_at_shard: int | None = None) -> dict:
    """Writes `genes[g]` patches per gene (2 patches per image) like bin/extract would.

    Skips shards already completed (resume). Returns {(image_id, patch_index): record}
    where record holds the gene, label and the original uint8 (size, size, 3) image.
    """
    rng = np.random.default_rng(seed)
    vocab = shards.make_gene_vocabulary(genes, {g: split for g in genes})
    info = shards.DatasetInfo(genes=vocab, donors=["D1", "D2"], source_size=2 * size,
                               patch_size=size, format=fmt, seed=seed)
    if shards.load_dataset_info(out) is None:
        shards.write_dataset_info(out, info)
    gene_index = info.gene_index()
    expected, by_gene = {}, {}
    image_id = 1000
    for g in sorted(genes):
        by_gene[g] = []
        for p in range(genes[g]):
            if p % 2 == 0:
                image_id += 1
            img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            rec = {"gene_symbol": g, "gene_index": gene_index[g], "image_id": image_id,
                   "patch_index": p % 2, "x": 3 * p, "y": 5 * p, "donor_id": f"D{p % 2 + 1}",
                   "donor_index": p % 2, "image": img}
            expected[(image_id, p % 2)] = rec
            by_gene[g].append(rec)
    done = shards.completed_shards(out, split)
    shard_of = shards.assign_shards(genes, num_shards)
    for k in range(num_shards):
        if k in done:
            continue
        with shards.ShardWriter(out, split, k, num_shards, compression) as w:
            for g in sorted(g for g in genes if shard_of[g] == k):
                for i, rec in enumerate(by_gene[g]):
                    if fail_at_shard == k and i == 1:
                        raise RuntimeError("simulated crash")
                    w.write(records.make_example(
                        image_encoded=encode(rec["image"], fmt), image_height=size,
                        image_width=size, image_id=rec["image_id"],
                        patch_index=rec["patch_index"], x=rec["x"], y=rec["y"],
                        source_size=2 * size, gene_symbol=g, gene_index=rec["gene_index"],
                        donor_id=rec["donor_id"], donor_index=rec["donor_index"],
                        study="synthetic", region="CTX"), g, rec["image_id"])
        shards.update_index(out, w.info)
    return expected


def read_all(files: list[str]) -> list[dict]:
    out = []
    for f in files:
        for s in tf.data.TFRecordDataset(f, compression_type=shards.compression_of(f) or ""):
            feats = records.parse_example(s)
            out.append({k: v.numpy() for k, v in feats.items()})
    return out


def test_make_and_parse_round_trip_every_field():
    img = np.random.default_rng(1).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    fields = {"image/encoded": encode(img), "image/format": "png", "image/height": 8,
              "image/width": 12, "image_id": 7, "patch_index": 3, "x": 100, "y": 200,
              "source_size": 512, "gene_symbol": "PVALB", "gene_index": 5, "entrez_id": 5816,
              "donor_id": "H08-0020", "donor_index": 2, "region": "V1", "study": "cortex",
              "label": 1, "vector": [0.5, -1.25, 3.0]}
    # Every feature of a JPEG/PNG record (the raw-image keys are written for raw images only).
    assert set(fields) == set(records.FEATURE_KEYS) - set(records.RAW_IMAGE_KEYS)
    parsed = records.parse_example(tf.constant(records.make_example(**fields)))
    for key, value in fields.items():
        got = parsed[key].numpy()
        if key == "vector":
            np.testing.assert_array_equal(got, np.float32(value))
        elif isinstance(value, str):
            assert got.decode() == value, key
        else:
            assert got == value, key
    np.testing.assert_array_equal(records.decode_image(parsed).numpy(), img)


def test_make_example_defaults_aliases_and_sniffing():
    img = np.zeros((4, 4, 3), np.uint8)
    ser = records.make_example(image_encoded=encode(img, "jpeg"), height=4, width=4,
                               image_id=1, gene_symbol="A", gene_index=0)
    p = {k: v.numpy() for k, v in records.parse_example(ser).items()}
    assert p["image/format"] == b"jpeg" and p["source_size"] == 4
    assert p["entrez_id"] == -1 and p["label"] == -1 and p["donor_index"] == -1
    assert p["vector"].shape == (0,) and p["donor_id"] == b""
    assert records.decode_image(p, size=4).shape == (4, 4, 3)


def test_make_example_bytes_do_not_depend_on_the_process():
    # Protobuf maps serialize in an order that can differ between processes; records
    # list their features in key order so the same patches give the same shard bytes.
    data = records.make_example(image_encoded=encode(np.zeros((8, 8, 3), np.uint8), "png"),
                                image_height=8, image_width=8,
                                image_id=7, gene_symbol="G", gene_index=0, donor_id="D1")
    keys = sorted(set(records.FEATURE_KEYS) - set(records.RAW_IMAGE_KEYS))
    positions = [data.index(b"\n" + bytes([len(k)]) + k.encode()) for k in keys]
    assert positions == sorted(positions)


def test_make_example_rejects_bad_input():
    base = dict(image_encoded=encode(np.zeros((2, 2, 3), np.uint8)), height=2, width=2,
                image_id=1, gene_symbol="A", gene_index=0)
    with pytest.raises(RecordsError, match="missing required.*gene_index"):
        records.make_example(**{k: v for k, v in base.items() if k != "gene_index"})
    with pytest.raises(RecordsError, match="unknown feature 'colour'"):
        records.make_example(**base, colour=1)
    with pytest.raises(RecordsError, match="'x' must be an integer"):
        records.make_example(**base, x="3")
    with pytest.raises(RecordsError, match="neither JPEG nor PNG"):
        records.make_example(**{**base, "image_encoded": b"GIF89a..."})


def test_shard_name():
    assert shards.shard_name("train", 3, 16, None) == "train-00003-of-00016.tfrecord"
    assert shards.shard_name("test", 0, 1, "GZIP") == "test-00000-of-00001.tfrecord.gz"
    with pytest.raises(RecordsError):
        shards.shard_name("train", 4, 4, None)
    with pytest.raises(RecordsError, match="compression"):
        shards.shard_name("train", 0, 4, "ZLIB")


def test_index_genes_csv_and_layout(tmp_path):
    out = str(tmp_path)
    genes = {"Gad1": 4, "Pvalb": 3, "Sst": 1, "Vip": 2}
    expected = write_tiny_dataset(out, genes, num_shards=2)
    index = shards.load_index(out)
    assert [(s["split"], s["index"]) for s in index["shards"]] == [("train", 0), ("train", 1)]
    assert shards.completed_shards(out, "train") == {0, 1}
    assert shards.completed_shards(out, "test") == set()
    # Sorted genes round-robin: Gad1, Sst -> shard 0; Pvalb, Vip -> shard 1.
    s0, s1 = index["shards"]
    assert s0["file"] == "train-00000-of-00002.tfrecord"
    assert s0["genes"] == {"Gad1": 4, "Sst": 1} and s1["genes"] == {"Pvalb": 3, "Vip": 2}
    assert s0["gene_offsets"] == {"Gad1": 0, "Sst": 4} and s0["num_records"] == 5
    assert s0["num_images"] == 3 and s0["gene_images"] == {"Gad1": 2, "Sst": 1}
    assert index["dataset"]["patch_size"] == 16 and index["dataset"]["donors"] == ["D1", "D2"]
    with open(os.path.join(out, "genes.csv")) as f:
        lines = f.read().split()
    assert lines[0] == "gene_symbol,gene_index,entrez_id,split,n_images,n_patches"
    assert lines[1:] == ["Gad1,0,-1,train,2,4", "Pvalb,1,-1,train,2,3", "Sst,2,-1,train,1,1",
                         "Vip,3,-1,train,1,2"]
    # Each gene's extent points exactly at its contiguous records.
    for ext in shards.gene_extents(out, "train"):
        recs = read_all([ext.file])[ext.offset:ext.offset + ext.count]
        assert len(recs) == genes[ext.gene_symbol]
        assert {r["gene_symbol"].decode() for r in recs} == {ext.gene_symbol}
        assert {r["gene_index"] for r in recs} == {ext.gene_index}
    assert len(read_all([os.path.join(out, s["file"]) for s in index["shards"]])) == len(expected)


def test_offsets_sidecar_matches_scan(tmp_path):
    out = str(tmp_path)
    write_tiny_dataset(out, {"A": 3, "B": 2}, num_shards=1)
    shard = os.path.join(out, "train-00000-of-00001.tfrecord")
    side = framing.record_offsets(shard)
    np.testing.assert_array_equal(side, framing.scan_record_offsets(shard))
    assert len(side) == 6 and side[-1] == os.path.getsize(shard)
    fd = os.open(shard, os.O_RDONLY)
    try:
        third = framing.read_record_at(fd, int(side[2]), int(side[3] - side[2]))
    finally:
        os.close(fd)
    assert records.parse_example(third)["gene_symbol"].numpy() == b"A"
    with open(shard, "r+b") as f:  # truncate: the scan must notice
        f.truncate(int(side[-1]) - 3)
    with pytest.raises(RecordsError, match="truncated"):
        framing.scan_record_offsets(shard)


def test_crash_mid_shard_leaves_no_file_and_index_unchanged(tmp_path):
    out = str(tmp_path)
    write_tiny_dataset(out, {"A": 2, "B": 2, "C": 2}, num_shards=3, fail_at_shard=None)
    before = open(os.path.join(out, "index.json")).read()
    with pytest.raises(RuntimeError, match="simulated"):
        with shards.ShardWriter(out, "validation", 0, 1) as w:
            w.write(b"x", "A", 1)
            raise RuntimeError("simulated crash")
    assert not os.path.exists(os.path.join(out, "validation-00000-of-00001.tfrecord"))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert open(os.path.join(out, "index.json")).read() == before
    assert shards.completed_shards(out, "validation") == set()


def test_resume_skips_completed_shards_without_duplicates(tmp_path):
    out = str(tmp_path)
    genes = {f"G{i}": 2 + i % 3 for i in range(7)}
    with pytest.raises(RuntimeError, match="simulated"):
        write_tiny_dataset(out, genes, num_shards=4, fail_at_shard=2)
    assert shards.completed_shards(out, "train") == {0, 1}
    mtime = os.path.getmtime(os.path.join(out, "train-00000-of-00004.tfrecord"))
    expected = write_tiny_dataset(out, genes, num_shards=4)
    assert shards.completed_shards(out, "train") == {0, 1, 2, 3}
    # Completed shards were not rewritten.
    assert os.path.getmtime(os.path.join(out, "train-00000-of-00004.tfrecord")) == mtime
    files = [os.path.join(out, shards.shard_name("train", k, 4)) for k in range(4)]
    got = [(r["image_id"], r["patch_index"]) for r in read_all(files)]
    assert len(got) == len(set(got)) == len(expected) == sum(genes.values())
    assert set(got) == set(expected)
    assert sum(s["num_records"] for s in shards.load_index(out)["shards"]) == len(expected)


def test_writer_rejects_non_contiguous_gene_and_shard_count_change(tmp_path):
    out = str(tmp_path)
    w = shards.ShardWriter(out, "train", 0, 2)
    w.write(b"a", "A", 1)
    w.write(b"b", "B", 2)
    with pytest.raises(RecordsError, match="'A' are not contiguous"):
        w.write(b"c", "A", 3)
    shards.update_index(out, w.close())
    w2 = shards.ShardWriter(out, "train", 0, 3)
    with pytest.raises(RecordsError, match="fresh output directory"):
        shards.update_index(out, w2.close())
    with pytest.raises(RecordsError, match="no index.json"):
        shards.load_index(str(tmp_path / "nowhere"))


def test_split_genes_deterministic_disjoint_and_proportional():
    genes = [f"g{i:03d}" for i in range(200)]
    a = shards.split_genes(genes, seed=3)
    assert a == shards.split_genes(list(reversed(genes)), seed=3)  # order-independent
    assert a != shards.split_genes(genes, seed=4)
    assert set(a) == set(genes)  # every gene exactly once (dict keys: disjoint)
    counts = {s: sum(v == s for v in a.values()) for s in shards.SPLITS}
    assert counts == {"train": 160, "validation": 20, "test": 20}
    for n in (3, 4, 7):
        assert set(shards.split_genes(genes[:n]).values()) == set(shards.SPLITS)
    assert sorted(shards.split_genes(["a", "b"]).values()) == ["train", "validation"]
    d = shards.split_donors(["H1", "H2", "H3", "H4", "H5", "H6"], (0.5, 0.25, 0.25), seed=1)
    assert sorted(d.values()) == ["test", "train", "train", "train", "validation", "validation"]
    with pytest.raises(RecordsError):
        shards.split_genes(genes, (0.8, 0.2))
    with pytest.raises(RecordsError, match="empty"):
        shards.split_genes([])

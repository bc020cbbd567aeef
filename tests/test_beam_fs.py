"""bin/extract --runner=beam with the manifest, images and OUT at URLs (`ish_tf.fs`).

`ram://` is TensorFlow's in-process filesystem: with Beam's FnApiRunner in_memory (the
default for one worker) driver and worker share the process, so it stands in for
`gs://` without a network. The shards read back from ram:// must equal a local-path
Beam run's byte for byte."""

from __future__ import annotations

import json
import os
import uuid

import pytest

pytest.importorskip("apache_beam")
tf = pytest.importorskip("tensorflow")

from ish_tf import fs  # noqa: E402
from ish_tf.data import beam_extract as B  # noqa: E402
from ish_tf.data import shards  # noqa: E402
from tests.test_beam_extract import _cfg, synth  # noqa: E402,F401


def _copy_tree(src: str, dst: str) -> None:
    for root, _, names in os.walk(src):
        rel = os.path.relpath(root, src)
        target = dst if rel == "." else fs.join(dst, *rel.split(os.sep))
        tf.io.gfile.makedirs(target)
        # Sorted: a shard before its `.offsets.npy` (ram:// takes a name that prefixes an
        # existing one, "x.tfrecord" of "x.tfrecord.offsets.npy", for a directory).
        for name in sorted(names):
            tf.io.gfile.copy(os.path.join(root, name), fs.join(target, name), overwrite=True)


def _put(path: str, data: bytes) -> None:
    """Writes a file at a URL (removed first: ram:// appends to an existing file)."""
    fs.remove(path)
    tf.io.gfile.makedirs(fs.dirname(path))
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(data)


def _tree(out: str) -> dict[str, bytes]:
    """Every output file (relative name -> bytes) but hidden files and index.json, which
    names the manifest's path."""
    found = {}
    for root, _, names in tf.io.gfile.walk(out):
        for name in names:
            path = fs.join(root, name)
            rel = path[len(out):].lstrip("/")
            if name.startswith(".") or name == "index.json":
                continue
            with tf.io.gfile.GFile(path, "rb") as f:
                found[rel] = f.read()
    return found


@pytest.fixture(scope="module")
def local_beam(synth, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("beam_local")
    summary = B.run_extract_beam(_cfg(synth, out))
    return out, summary


@pytest.fixture(scope="module")
def ram_synth(synth):  # noqa: F811
    """The synthetic manifest and its images copied to ram://; yields the manifest URL."""
    root = f"ram://beam_fs_{uuid.uuid4().hex}"
    _copy_tree(str(synth), fs.join(root, "synth"))
    yield fs.join(root, "synth", "manifest.csv")  # relative image paths: below it
    fs.rmtree(root)


def test_fs_paths_local_and_url():
    from ish_tf.data.manifest import image_path

    assert not fs.is_url("/data/x") and not fs.is_url("c:/x") and fs.is_url("gs://b/x")
    assert fs.abspath("gs://b/x") == "gs://b/x"
    assert image_path("gs://b/m/manifest.csv", "../img/1.jpg") == "gs://b/img/1.jpg"
    assert image_path("/local/manifest.csv", "gs://b/1.jpg") == "gs://b/1.jpg"
    base = f"ram://fs_{uuid.uuid4().hex}"
    with fs.open(fs.join(base, "a.txt"), "w") as f:
        f.write("x\n")
    assert fs.isfile(fs.join(base, "a.txt")) and fs.isdir(base) and fs.getsize(
        fs.join(base, "a.txt")) == 2
    fs.replace(fs.join(base, "a.txt"), fs.join(base, "b.txt"))
    assert fs.listdir(base) == ["b.txt"]
    fs.remove(fs.join(base, "a.txt"))  # missing: fine
    with pytest.raises(FileNotFoundError):
        fs.open(fs.join(base, "a.txt"), "rb")
    fs.rmtree(base)
    assert not fs.exists(fs.join(base, "b.txt"))


def test_beam_extract_on_ram_urls_equals_local_paths(synth, ram_synth, local_beam):  # noqa: F811
    local, want_summary = local_beam
    manifest = ram_synth
    out = f"ram://beam_fs_out_{uuid.uuid4().hex}"
    summary = B.run_extract_beam(_cfg(synth, out, manifest=manifest))
    assert summary["shards_written"] == want_summary["shards_written"] > 0
    got, want = _tree(out), _tree(str(local))
    assert sorted(got) == sorted(want)
    assert any(n.endswith(".tfrecord") for n in got) and "extract_report.csv" in got
    assert any(n.startswith("masks/") for n in got)
    for name in want:  # shards, offsets, report, genes.csv, masks: the same bytes
        assert got[name] == want[name], name
    with tf.io.gfile.GFile(fs.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["shards"] == shards.load_index(str(local))["shards"]
    assert index["dataset"]["extra"]["manifest"] == manifest  # a URL kept as it is
    assert not tf.io.gfile.exists(fs.join(out, B.STAGING))
    assert not tf.io.gfile.exists(fs.join(out, B.RESULTS))

    # An interrupted run's leftovers at the URL: a staged shard, a result without a
    # listed shard, a temporary file; the index loses one shard (as if the run died
    # before listing it). The rerun takes none of them for complete and redoes the shard.
    index_shards = index["shards"]
    dropped = index_shards[-1]["file"]
    index["shards"] = index_shards[:-1]
    _put(fs.join(out, "index.json"), json.dumps(index).encode())
    _put(fs.join(out, dropped), b"partial")  # a half-copied shard: present, not listed
    _put(fs.join(out, B.STAGING, "x", "y", dropped), b"partial")
    _put(fs.join(out, B.RESULTS, "x.json"), b"{}")
    _put(fs.join(out, f".{dropped}.abc.tmp"), b"partial")
    again = B.run_extract_beam(_cfg(synth, out, manifest=manifest))
    assert again["shards_written"] == 1
    assert again["shards_resumed"] == summary["shards_written"] - 1
    assert _tree(out) == want
    assert not tf.io.gfile.exists(fs.join(out, f".{dropped}.abc.tmp"))
    assert not tf.io.gfile.exists(fs.join(out, B.STAGING))
    fs.rmtree(out)


def test_cli_runner_beam_with_url_manifest_and_out(synth, ram_synth, local_beam, capsys):  # noqa: F811
    from ish_tf import cli
    from ish_tf.cli import extract

    out = f"ram://beam_fs_cli_{uuid.uuid4().hex}"
    argv = [f"--manifest={ram_synth}", f"--out={out}", "--patches_per_image=3",
            "--source_size=96", "--patch_size=24", "--min_fraction=0.8", "--max_tries=100",
            "--num_shards=2", "--seed=4", "--fast_decode", "--runner=beam"]
    assert extract.main(cli.parse("extract", argv), []) == 0
    assert f"into {out}" in capsys.readouterr().out
    got, want = _tree(out), _tree(str(local_beam[0]))
    assert {n for n in got if n.endswith(".tfrecord")} == {n for n in want
                                                            if n.endswith(".tfrecord")}
    for name in want:
        if name.endswith((".tfrecord", ".npy", ".csv")):
            assert got[name] == want[name], name
    assert fs.exists(fs.join(out, "extract_flags.cfg"))
    assert not os.path.exists("ram:")  # no local directory named after the URL
    fs.rmtree(out)


def test_url_images_missing_or_whole_slide_are_named():
    from ish_tf.data import image_io

    with pytest.raises(FileNotFoundError, match="ram://"):
        image_io.read_image(f"ram://missing_{uuid.uuid4().hex}/x.jpg", 1)
    with pytest.raises(image_io.ImageReadError, match="local paths only"):
        path = f"ram://tiff_{uuid.uuid4().hex}/x.tif"
        with tf.io.gfile.GFile(path, "wb") as f:
            f.write(b"II*\x00")
        image_io.read_image(path, 1)


def test_beam_embedding_on_ram_urls_equals_local_tables(tmp_path):
    """bin/embed --runner=beam with the records and OUT at ram://: the local tables."""
    import numpy as np

    from ish_tf import embed, embed_beam
    from ish_tf.data.embeddings import read_embedding_table
    from ish_tf.export import saved_model as sm
    from tests.test_embed import _model, write_records

    model_dir = str(tmp_path / "tiny")
    sm.export_saved_model(_model(), model_dir)
    records = str(tmp_path / "records")
    write_records(records)
    root = f"ram://embed_fs_{uuid.uuid4().hex}"
    _copy_tree(records, fs.join(root, "records"))
    _copy_tree(model_dir, fs.join(root, "tiny"))  # the SavedModel at a URL too

    def cfg(model, records_dir, out, fmt):
        return embed.EmbedConfig(saved_model=model, records_dir=records_dir, out_dir=out,
                                 batch_size=3, table_format=fmt)

    for fmt in ("parquet", "csv"):
        local = embed.embed_records(cfg(model_dir, records, str(tmp_path / f"local_{fmt}"), fmt))
        out = fs.join(root, f"out_{fmt}")
        beam = embed_beam.embed_records_beam(cfg(fs.join(root, "tiny"), fs.join(root, "records"),
                                                 out, fmt))
        assert beam.tables.keys() == local.tables.keys() and beam.rows == local.rows
        assert beam.patches_embedded == local.rows["patch"]
        for level, path in local.tables.items():
            assert beam.tables[level].startswith(root) and fs.exists(beam.tables[level])
            a, b = read_embedding_table(path), read_embedding_table(beam.tables[level])
            assert a.keys.equals(b.keys), level
            np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-6)
        assert not fs.exists(fs.join(out, embed.PARTS_DIR))
        assert fs.exists(fs.join(out, embed.SUMMARY_NAME))
        assert fs.exists(fs.join(out, embed.SKIPPED_NAME))
    fs.rmtree(root)

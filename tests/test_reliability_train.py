"""Reliability of training (issue "Nothing lost, nothing silent"), one test per fault.

Every fault of the records, the flags, the checkpoints or the run directory stops
bin/train with one line naming what failed (`train: error: ...`, exit 1; usage errors
exit 2), or is handled with nothing lost. Faults come from tests/faults.py.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from faults import failing_checkpoint_saves, failing_writes, flip_bytes, read_only_dir, truncate
from test_records import write_tiny_dataset

from ish_tf import cli
from ish_tf.data import framing, input_checks, pipeline, records, shards
from ish_tf.data.records import RecordsError
from ish_tf.families import ModelConfig, make_task
from ish_tf.families.triplet.config import TripletConfig
from ish_tf.train import TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENES = {f"G{i}": 4 for i in range(6)}


def _records(path, genes=None) -> str:
    """One uncompressed shard of 16x16 PNG patches, 4 per gene (bin/extract's layout)."""
    out = str(path)
    write_tiny_dataset(out, genes or GENES, num_shards=1)
    return out


def _shard(records_dir: str) -> str:
    return pipeline.list_shards(records_dir, "train")[0]


def _argv(records_dir, run_dir, *extra) -> list[str]:
    """A tiny triplet run: P=3 genes x K=4 patches (every record of a gene), 2 steps."""
    return [f"--flagfile={os.path.join(ROOT, 'configs', 'triplet_quickstart.cfg')}",
            f"--records_dir={records_dir}", f"--run_dir={run_dir}", "--steps=2",
            "--triplet_P=3", "--triplet_K=4", "--input_size=16", "--triplet_head_units=8",
            "--triplet_embedding_dim=4", "--log_every=1", "--checkpoint_every=1",
            "--noimage_summaries", *extra]


def _train_cli(capsys, argv) -> tuple[int, str]:
    """Runs bin/train in this process; (exit status, stderr); stdout goes to `_out`."""
    rc = cli.invoke("train", argv)
    captured = capsys.readouterr()
    _out[:] = [captured.out]
    return rc, captured.err


_out: list[str] = [""]


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _take_all(ds, n=4):
    for _ in ds.take(n):
        pass


def _describe(make_ds, records_dir) -> str:
    with pytest.raises(tf.errors.OpError) as info:
        _take_all(make_ds())
    return input_checks.describe_input_error(info.value, records_dir, "train")


# --------------------------------------------------------------------------- 1. CRC
def test_crc32c_matches_the_standard_and_tensorflow_framing(tmp_path):
    assert framing.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 63, 64, 255, 256, 257, 4099, 70_001):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert framing.crc32c(data) == framing._crc32c_small(data), n
    # Every record TensorFlow wrote passes the check, framing included.
    out = _records(tmp_path)
    shard = _shard(out)
    offsets = framing.record_offsets(shard)
    with open(shard, "rb") as f:
        raw = f.read()
    for i in range(len(offsets) - 1):
        data = framing.check_record_framing(raw[offsets[i]:offsets[i + 1]], shard, i)
        assert records.parse_example(data)["gene_symbol"].numpy().decode() in GENES


def test_corrupt_shard_pk_reader_names_shard_record_and_offset(tmp_path):
    out = _records(tmp_path)
    shard = _shard(out)
    offsets = framing.record_offsets(shard)
    # A byte in the middle of record 5's data (it may still parse and decode).
    middle = int(offsets[5] + offsets[6]) // 2
    flip_bytes(shard, count=1, start=middle, end=middle + 1)
    message = _describe(lambda: pipeline.pk_dataset(out, "train", P=6, K=4, flips=False), out)
    assert message == (f"{shard}: record 5 at byte {int(offsets[5])}: the data fails its "
                       "CRC check (corrupt shard); extract it again")
    # The length header has its own CRC.
    fresh = _records(tmp_path / "b")
    shard_b = _shard(fresh)
    off_b = framing.record_offsets(shard_b)
    flip_bytes(shard_b, count=1, start=int(off_b[2]) + 9, end=int(off_b[2]) + 10)
    message = _describe(lambda: pipeline.pk_dataset(fresh, "train", P=6, K=4), fresh)
    assert f"{shard_b}: record 2 at byte {int(off_b[2])}: the length header fails" in message


def test_corrupt_shard_bin_train_stops_naming_it(tmp_path, capsys):
    """Today: a record whose data CRC does not match trained silently (exit 0)."""
    out = _records(tmp_path / "rec")
    shard = _shard(out)
    offsets = framing.record_offsets(shard)
    end = int(offsets[7])  # the last byte of record 6's data CRC
    flip_bytes(shard, count=1, start=end - 1, end=end)
    rc, err = _train_cli(capsys, _argv(out, tmp_path / "run"))
    assert rc == 1
    line = _error_line(err)
    assert line.startswith("train: error: reading the training data for step ")
    assert line.endswith(f"failed: {shard}: record 6 at byte {int(offsets[6])}: the data "
                         "fails its CRC check (corrupt shard); extract it again")
    assert not os.path.exists(tmp_path / "run" / "model.keras")


def test_corrupt_shard_plain_reader_names_the_shard(tmp_path):
    """Today: a bare DataLossError 'corrupted record at N', naming no file."""
    out = _records(tmp_path)
    shard = _shard(out)
    offsets = framing.record_offsets(shard)
    middle = int(offsets[3] + offsets[4]) // 2
    flip_bytes(shard, count=1, start=middle, end=middle + 1)
    message = _describe(
        lambda: pipeline.patch_dataset(out, "train", batch_size=4, training=False), out)
    assert message.startswith(f"{shard}: record 3 at byte {int(offsets[3])}: ")
    assert "extract it again" in message


# --------------------------------------------------------------------------- 2. index counts
def test_truncated_shard_is_never_read_as_fewer_records(tmp_path):
    """Today: a shard cut at a record boundary read as fewer records (P×K: IndexError)."""
    out = _records(tmp_path)
    shard = _shard(out)
    offsets = framing.record_offsets(shard)
    truncate(shard, int(offsets[-2]))  # the last record is gone
    want = f"{shard}: index.json says 24 records, the shard holds 23"
    with pytest.raises(RecordsError, match=want):
        pipeline.pk_dataset(out, "train", P=3, K=4)
    with pytest.raises(RecordsError, match=want):
        pipeline.patch_dataset(out, "train", batch_size=4, training=True)
    truncate(shard, int(offsets[-3]) + 20)  # cut inside a record
    with pytest.raises(RecordsError, match=f"{shard}: index.json says 24 records, the shard "
                                           "holds 22 and a partial one"):
        pipeline.pk_dataset(out, "train", P=3, K=4)


def test_index_count_above_shard_names_both_counts(tmp_path):
    """Today: IndexError from the offsets when the index lists more records than a shard has."""
    out = _records(tmp_path)
    path = shards.index_path(out)
    index = json.load(open(path))
    index["shards"][0]["genes"]["G5"] = 6
    index["shards"][0]["num_records"] = 26
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(RecordsError, match=r"index.json says 26 records, the shard holds 24"):
        pipeline.pk_dataset(out, "train", P=3, K=4)
    # Only the gene's count raised: the gene's records would run past the shard's end.
    index["shards"][0]["num_records"] = 24
    with open(path, "w") as f:
        json.dump(index, f)
    with pytest.raises(RecordsError, match=r"says gene 'G5' has records 20..25, the shard "
                                           r"holds 24"):
        pipeline.pk_dataset(out, "train", P=3, K=4)


# --------------------------------------------------------------------------- 3. non-image bytes
def _non_image_records(out: str, bad_record: int = 5) -> str:
    """4 genes x 4 records; record `bad_record` holds text where a PNG should be."""
    symbols = [f"G{i}" for i in range(4)]
    vocab = shards.make_gene_vocabulary(symbols, {g: "train" for g in symbols})
    png = tf.io.encode_png(np.zeros((16, 16, 3), np.uint8)).numpy()
    with shards.ShardWriter(out, "train", 0, 1) as w:
        n = 0
        for g in vocab:
            for _ in range(4):
                encoded = b"this is not an image" * 4 if n == bad_record else png
                w.write(records.make_example(encoded=encoded, format="png", height=16,
                                             width=16, image_id=n, gene_symbol=g.gene_symbol,
                                             gene_index=g.gene_index), g.gene_symbol, n)
                n += 1
    shards.update_index(out, w.info)
    shards.write_dataset_info(out, shards.DatasetInfo(genes=vocab, patch_size=16, format="png"))
    return out


def test_non_image_record_names_shard_and_record(tmp_path, capsys):
    """Today: 'Unknown image file format' from inside tf.data, naming nothing."""
    out = _non_image_records(str(tmp_path / "rec"))
    shard = _shard(out)
    offsets = framing.record_offsets(shard)
    want = "image/encoded is neither a JPEG nor a PNG image (non-image bytes)"
    message = _describe(lambda: pipeline.pk_dataset(out, "train", P=4, K=4), out)
    assert message == f"{shard}: record 5 at byte {int(offsets[5])}: {want}"
    message = _describe(
        lambda: pipeline.patch_dataset(out, "train", batch_size=16, training=False), out)
    assert message == f"{shard}: record 5: {want}"
    rc, err = _train_cli(capsys, _argv(out, tmp_path / "run", "--triplet_P=4"))
    assert rc == 1 and f"{shard}: record 5 at byte {int(offsets[5])}: {want}" in _error_line(err)


def test_pipeline_error_exits_bin_train_without_hanging(tmp_path):
    """A failure inside the input pipeline ends the process (one line, exit 1), however
    many reader threads were in flight; before, such an error could leave it running."""
    out = _non_image_records(str(tmp_path / "rec"))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "ish_tf.cli.train",
                           *_argv(out, tmp_path / "run", "--triplet_P=4")],
                          capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "neither a JPEG nor a PNG" in _error_line(done.stderr)
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------- 4. no patches
def test_extraction_with_no_patches_is_a_clear_error(tmp_path, capsys):
    """Today: KeyError 'pop from an empty set'."""
    out = str(tmp_path / "rec")
    with shards.ShardWriter(out, "train", 0, 1) as w:
        pass
    shards.update_index(out, w.info)
    shards.write_dataset_info(out, shards.DatasetInfo(genes=[], patch_size=16, format="png"))
    want = f"{out}: split 'train' has no records"
    with pytest.raises(RecordsError, match=want):
        pipeline.pk_dataset(out, "train", P=3, K=4)
    with pytest.raises(RecordsError, match=want):
        pipeline.patch_dataset(out, "train", batch_size=4, training=True)
    rc, err = _train_cli(capsys, _argv(out, tmp_path / "run"))
    assert rc == 1
    line = _error_line(err)
    assert want in line and "extract again" in line


# --------------------------------------------------------------------------- 5. flags
def test_sizes_must_be_positive(tmp_path, capsys):
    rc, err = _train_cli(capsys, _argv(tmp_path, tmp_path / "run", "--input_size=0"))
    assert rc == 2 and "--input_size=0" in err
    # The library says so too, before TensorFlow does (it failed inside tf.data).
    cfg = ModelConfig(input_size=0, family=TripletConfig(backbone="small_cnn",
                                                         backbone_weights="none"))
    with pytest.raises(ValueError, match="--input_size must be >= 1, got 0"):
        make_task(cfg, TrainConfig(records_dir=str(tmp_path)))


def test_triplet_K1_is_rejected(tmp_path, capsys):
    """Today: K=1 trained nothing (loss, gradients, active triplets 0) and exited 0."""
    with pytest.raises(ValueError, match="--triplet_K must be >= 2"):
        TripletConfig(K=1).validate()
    rc, err = _train_cli(capsys, _argv(tmp_path, tmp_path / "run", "--triplet_K=1"))
    assert rc == 2 and "--triplet_K" in _error_line(err)
    assert not os.path.exists(tmp_path / "run" / "model.keras")


def test_P_K_against_the_identities_of_the_split(tmp_path, capsys):
    """Today: genes with fewer than K records filled the batch with repeats, silently."""
    out = _records(tmp_path / "rec", {"A": 4, "B": 4, "C": 1, "D": 1, "E": 1})
    with pytest.raises(RecordsError, match=r"split 'train' has 2 genes with at least K=4 "
                                           r"records \(5 genes, 11 records in all\), but a "
                                           r"P×K batch needs P=3"):
        input_checks.check_pk_identities(out, "train", 3, 4)
    assert input_checks.check_pk_identities(out, "train", 2, 4) == 2
    rc, err = _train_cli(capsys, _argv(out, tmp_path / "run"))
    assert rc == 1 and "has 2 genes with at least K=4 records" in _error_line(err)
    assert not os.path.exists(tmp_path / "run" / "model.keras")
    # Fewer than 2 identities with K records cannot make a triplet, whatever P.
    one = _records(tmp_path / "one", {"A": 4, "C": 1})
    with pytest.raises(RecordsError, match="has 1 genes with at least K=2"):
        input_checks.check_pk_identities(one, "train", 1, 2)
    # P above the identities of the split at all.
    with pytest.raises(RecordsError, match="split 'train': P=7 genes per batch but the split "
                                           "has only 5 genes with records"):
        pipeline.pk_dataset(out, "train", P=7, K=2)


# --------------------------------------------------------------------------- 6. checkpoints
def _ckpt_steps(directory) -> list[int]:
    return sorted(int(p.rsplit("-", 1)[1].split(".")[0])
                  for p in glob.glob(os.path.join(directory, "ckpt-*.index")))


def test_truncated_latest_checkpoint_falls_back(tmp_path, capsys, caplog):
    """Today: IndexError 'Read less bytes than requested', no fallback."""
    out = _records(tmp_path / "rec")
    run = tmp_path / "run"
    assert _train_cli(capsys, _argv(out, run))[0] == 0
    ckpts = str(run / "checkpoints")
    assert _ckpt_steps(ckpts) == [1, 2]
    (data,) = glob.glob(os.path.join(ckpts, "ckpt-2.data-*"))
    half = truncate(data, os.path.getsize(data) // 2)
    caplog.set_level("WARNING")
    rc, _ = _train_cli(capsys, _argv(out, run, "--steps=3"))
    assert rc == 0 and "steps 1->3" in _out[0]
    warned = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(warned) == 1 and os.path.join(ckpts, "ckpt-2") in warned[0]
    # The bad checkpoint is kept (set aside, so the rerun's ckpt-2 did not overwrite it).
    kept = os.path.join(ckpts, "unreadable", os.path.basename(data))
    assert os.path.getsize(kept) == half
    assert os.path.join(ckpts, "unreadable", "ckpt-2") in warned[0]
    assert _ckpt_steps(ckpts) == [1, 2, 3]
    assert tf.train.latest_checkpoint(ckpts).endswith("ckpt-3")
    # No checkpoint restores: a clear error naming the run directory.
    for path in glob.glob(os.path.join(ckpts, "ckpt-*.data-*")):
        truncate(path, 10)
    rc, err = _train_cli(capsys, _argv(out, run, "--steps=4"))
    assert rc == 1
    assert _error_line(err).startswith(f"train: error: {run}: no checkpoint in {ckpts} restores")


# --------------------------------------------------------------------------- 7. writes
def test_read_only_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    """Today: a raw OSError traceback."""
    out = _records(tmp_path / "rec")
    run = tmp_path / "run"
    with read_only_dir(str(run), monkeypatch):
        rc, err = _train_cli(capsys, _argv(out, run))
    assert rc == 1
    assert _error_line(err) == (f"train: error: {run / 'flags.cfg'}: cannot write "
                                f"({os.strerror(errno.EACCES)})")


def test_full_disk_mid_run_keeps_the_checkpoints(tmp_path, capsys, monkeypatch):
    """Today: a raw OSError (metrics.csv) or ResourceExhaustedError (checkpoint) traceback."""
    out = _records(tmp_path / "rec")
    run = tmp_path / "run"
    assert _train_cli(capsys, _argv(out, run))[0] == 0
    ckpts = str(run / "checkpoints")
    before = {p: os.path.getsize(p) for p in glob.glob(os.path.join(ckpts, "*"))}
    # The disk fills up: metrics.csv cannot be rewritten at the next log step.
    with monkeypatch.context() as m:
        failing_writes(m, str(run), errno.ENOSPC, when=lambda p: "metrics" in p)
        rc, err = _train_cli(capsys, _argv(out, run, "--steps=4"))
    assert rc == 1
    assert _error_line(err) == (f"train: error: {run / 'metrics.csv'}: cannot write "
                                f"({os.strerror(errno.ENOSPC)})")
    # TensorFlow's own checkpoint write fails (C++: seen as ResourceExhaustedError).
    with monkeypatch.context() as m:
        saved = failing_checkpoint_saves(m, after=1)
        rc, err = _train_cli(capsys, _argv(out, run, "--steps=5"))
    assert rc == 1 and len(saved) == 1
    line = _error_line(err)
    assert line.startswith(f"train: error: {ckpts}: cannot write (") and "No space left" in line
    # Nothing written before is lost.
    for path, size in before.items():
        if os.path.basename(path) != "checkpoint":
            assert os.path.getsize(path) == size, path
    assert {1, 2} <= set(_ckpt_steps(ckpts))

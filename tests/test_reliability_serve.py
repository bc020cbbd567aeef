"""Reliability of the serving side ("Nothing lost, nothing silent"): export, embed, evaluate.

Each test is named for the fault it injects; each fault ends in a clear error naming the
file, flag or shard (non-zero exit through the CLI), or is handled with nothing lost.
"""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from faults import failing_writes, flip_bytes, truncate_file  # noqa: E402
from test_embed import write_records  # noqa: E402
from test_export import _fake_run, tiny_model  # noqa: E402

from ish_tf import cli, embed  # noqa: E402
from ish_tf.data import shards  # noqa: E402
from ish_tf.export import saved_model as sm  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, model):
    base = str(tmp_path_factory.mktemp("export") / "tiny")
    sm.export_saved_model(model, base)
    return base


# --------------------------------------------------------------------------- 1: export rotation
def _notes(base: str, names) -> None:
    for n in names:
        os.makedirs(os.path.join(base, str(n)))
        with open(os.path.join(base, str(n), "notes.txt"), "w") as f:
            f.write(f"my notes {n}\n")


def test_export_keep_never_deletes_numeric_folders_that_are_not_savedmodels(
        tmp_path, model, capsys):
    run = _fake_run(tmp_path, model)
    base = str(tmp_path / "exp")
    _notes(base, range(1, 8))
    assert cli.invoke("export", [f"--model_dir={run}", f"--export_dir={base}",
                                 "--keep=3"]) == 0
    for n in range(1, 8):  # every note survives, with its file
        assert open(os.path.join(base, str(n), "notes.txt")).read() == f"my notes {n}\n"
    assert sm.exported_versions(base) == [8]
    out = capsys.readouterr().out
    assert "versions kept" in out and "[8]" in out
    # Rotation counts only ish_tf's own SavedModels: 3 exports more keep 9, 10, 11.
    for _ in range(3):
        sm.export_saved_model(model, base, keep=3)
    assert sm.exported_versions(base) == [9, 10, 11]
    assert all(os.path.isfile(os.path.join(base, str(n), "notes.txt")) for n in range(1, 8))
    # prune_versions itself never touches a foreign folder.
    assert sm.prune_versions(base, 1) == [9, 10]
    assert sm.list_versions(base) == [1, 2, 3, 4, 5, 6, 7, 11]
    # A SavedModel without our sidecar is not ours either.
    os.remove(os.path.join(base, "11", "assets.extra", "ish_tf.json"))
    sm.export_saved_model(model, base, keep=1)
    assert os.path.isfile(os.path.join(base, "11", "saved_model.pb"))


def test_export_version_in_the_way_is_a_foreign_folder(tmp_path, model, capsys):
    run = _fake_run(tmp_path, model)
    base = str(tmp_path / "exp")
    _notes(base, [3])
    for extra in ([], ["--overwrite"]):
        assert cli.invoke("export", [f"--model_dir={run}", f"--export_dir={base}",
                                     "--version=3", *extra]) == 1
        err = capsys.readouterr().err
        assert f"export: error: {os.path.join(base, '3')} exists and is not an ish_tf " \
               "SavedModel" in err
        assert open(os.path.join(base, "3", "notes.txt")).read() == "my notes 3\n"
    assert sorted(os.listdir(base)) == ["3"]  # no scratch directory left behind


def test_export_summary_uses_the_sidecar_signature_names(tmp_path, capsys):
    inputs = keras.Input((8, 8, 6))
    vec = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(inputs))
    run = tmp_path / "run6"
    run.mkdir()
    keras.Model(inputs, vec, name="six").save(str(run / "model.keras"))
    assert cli.invoke("export", [f"--model_dir={run}", f"--export_dir={tmp_path / 'e6'}",
                                 "--family=triplet"]) == 0
    out = capsys.readouterr().out
    assert "image_bytes" not in out
    assert "serving_default: images float32 (B, 8, 8, 6)" in out
    assert "tf_example: examples" in out


# --------------------------------------------------------------------------- 3: model.keras
def test_export_truncated_model_keras_is_named_not_file_not_found(tmp_path, model, capsys):
    run = _fake_run(tmp_path, model)
    path = os.path.join(run, "model.keras")
    truncate_file(path, 0.5)
    with pytest.raises(sm.ExportError) as e:
        sm.export_run(run, str(tmp_path / "exp"))
    assert "File not found" not in str(e.value)
    assert f"{path}: unreadable or truncated" in str(e.value)
    assert f"re-finish the training run {run}" in str(e.value)
    assert cli.invoke("export", [f"--model_dir={run}", f"--export_dir={tmp_path / 'exp'}"]) == 1
    err = capsys.readouterr().err
    assert f"export: error: {path}: unreadable or truncated" in err
    assert not os.path.exists(tmp_path / "exp") or sm.list_versions(str(tmp_path / "exp")) == []


def test_export_corrupt_model_keras_member_is_named(tmp_path, model):
    run = _fake_run(tmp_path, model)
    path = os.path.join(run, "model.keras")
    # Bytes inside the archive's members (not its directory): a CRC failure.
    flip_bytes(path, count=8, seed=1, start=200, end=os.path.getsize(path) // 2)
    with pytest.raises(sm.ExportError, match=r"model\.keras: (corrupt|unreadable)"):
        sm.export_run(run, str(tmp_path / "exp"))


# --------------------------------------------------------------------------- 7: export disk
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_export_full_or_read_only_export_dir_is_one_line(tmp_path, model, capsys, monkeypatch,
                                                         err):
    run = _fake_run(tmp_path, model)
    base = str(tmp_path / "exp")
    sm.export_saved_model(model, base)
    failing_writes(monkeypatch, base, err)
    assert cli.invoke("export", [f"--model_dir={run}", f"--export_dir={base}"]) == 1
    monkeypatch.undo()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("export: error: cannot write the export "
                                                   f"to {base}")
    assert os.strerror(err) in lines[0]
    assert sm.exported_versions(base) == [1]  # the version already there is intact
    assert sorted(os.listdir(base)) == ["1"]

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
from ish_tf.data import framing, shards  # noqa: E402
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


# --------------------------------------------------------------------------- 2: corrupt shards
def _train_shard(recs: str) -> tuple[str, int]:
    info = [s for s in shards.load_index(recs)["shards"] if s["split"] == "train"][0]
    return os.path.join(recs, info["file"]), int(info["num_records"])


def _flip_record(shard: str, record: int) -> None:
    """One flipped byte inside record `record`'s data: its CRC fails."""
    offsets = framing.record_offsets(shard)
    start = int(offsets[record]) + 12 + 5  # past the length (8) and its CRC (4)
    flip_bytes(shard, count=1, start=start, end=start + 1)


@pytest.fixture
def corrupt_records(tmp_path):
    recs = str(tmp_path / "records")
    write_records(recs)
    shard, n = _train_shard(recs)
    _flip_record(shard, 5)
    return recs, shard, n


def test_embed_one_flipped_byte_is_an_error_naming_the_shard_and_counts(
        exported, corrupt_records, tmp_path, capsys):
    recs, shard, n = corrupt_records
    out = str(tmp_path / "out")
    assert cli.invoke("embed", [f"--saved_model={exported}", f"--records_dir={recs}",
                                f"--out={out}", "--embed_batch_size=4"]) == 1
    err = capsys.readouterr().err
    assert f"embed: error: {shard}: unreadable record at record 5" in err
    assert f"index.json says {n} record(s), read 5" in err
    assert "--skip_corrupt" in err
    # Nothing is written as complete for that shard, nor any table.
    parts = os.listdir(os.path.join(out, embed.PARTS_DIR))
    assert os.path.basename(shard) + ".npz" not in parts
    assert not os.path.exists(os.path.join(out, "patch_embeddings.csv"))


def test_embed_skip_corrupt_embeds_the_rest_and_counts_one_lost_record(
        exported, corrupt_records, tmp_path, capsys):
    recs, shard, n = corrupt_records
    out = str(tmp_path / "out")
    assert cli.invoke("embed", [f"--saved_model={exported}", f"--records_dir={recs}",
                                f"--out={out}", "--embed_batch_size=4", "--skip_corrupt",
                                "--splits=train"]) == 0
    cap = capsys.readouterr()
    name = os.path.basename(shard)
    assert f"embed: warning: {name}: 1 record(s) lost" in cap.err
    patch = pd.read_csv(os.path.join(out, "patch_embeddings.csv"))
    assert len(patch) == n - 1  # only the corrupt record is lost, not the rest of the shard
    skipped = pd.read_csv(os.path.join(out, "skipped.csv"))
    assert skipped[["shard", "record", "n_records"]].values.tolist() == [[name, 5, 1]]
    assert skipped.loc[0, "error"].startswith(embed.LOST_PREFIX)
    summary = json.load(open(os.path.join(out, embed.SUMMARY_NAME)))
    assert summary["records_lost"] == 1 and summary["lost_by_shard"] == {name: 1}
    assert summary["skipped"] == 0


def test_embed_truncated_shard_is_an_error_or_counted_exactly(exported, tmp_path, capsys):
    recs = str(tmp_path / "records")
    write_records(recs)
    shard, n = _train_shard(recs)
    truncate_file(shard, 0.5)
    base = dict(saved_model=exported, records_dir=recs, splits=("train",), batch_size=4)
    with pytest.raises(embed.EmbedError, match=rf"index.json says {n} record\(s\), read \d+"):
        embed.embed_records(embed.EmbedConfig(**base, out_dir=str(tmp_path / "a")))
    res = embed.embed_records(embed.EmbedConfig(**base, out_dir=str(tmp_path / "b"),
                                                skip_corrupt=True))
    read = res.rows["patch"]
    assert 0 < read < n and res.records_lost == n - read
    skipped = pd.read_csv(res.skipped_path)
    assert int(skipped["n_records"].sum()) == n - read


def test_embed_shard_shorter_than_its_index_entry_is_an_error(exported, tmp_path):
    recs = str(tmp_path / "records")
    write_records(recs)
    index_file = shards.index_path(recs)
    index = json.load(open(index_file))
    for s in index["shards"]:
        if s["split"] == "train":
            s["num_records"] += 3
            n = s["num_records"]
    with open(index_file, "w") as f:
        json.dump(index, f)
    base = dict(saved_model=exported, records_dir=recs, splits=("train",))
    with pytest.raises(embed.EmbedError, match=rf"index.json says {n} record\(s\), read {n - 3}"):
        embed.embed_records(embed.EmbedConfig(**base, out_dir=str(tmp_path / "a")))
    res = embed.embed_records(embed.EmbedConfig(**base, out_dir=str(tmp_path / "b"),
                                                skip_corrupt=True))
    assert res.records_lost == 3 and res.rows["patch"] == n - 3


# --------------------------------------------------------------------------- 4: foreign SavedModel
def test_embed_refuses_a_savedmodel_without_ish_tf_metadata(exported, tmp_path, capsys):
    recs = str(tmp_path / "records")
    write_records(recs)
    victim = tmp_path / "written_by_the_model.txt"

    class Evil(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve(self, examples):
            tf.io.write_file(str(victim), "pwned")
            return {"embedding": tf.zeros([tf.shape(examples)[0], 2])}

    evil = Evil()
    path = str(tmp_path / "evil" / "1")
    tf.saved_model.save(evil, path, signatures={"tf_example": evil.serve})
    out = str(tmp_path / "out")
    assert cli.invoke("embed", [f"--saved_model={path}", f"--records_dir={recs}",
                                f"--out={out}"]) == 1
    err = capsys.readouterr().err
    assert "refusing to load a SavedModel without ish_tf's export metadata" in err
    assert "A SavedModel is code" in err and "--allow_foreign_saved_model" in err
    assert not victim.exists()
    # Told otherwise, explicitly: it is loaded (and runs).
    assert cli.invoke("embed", [f"--saved_model={path}", f"--records_dir={recs}",
                                f"--out={out}", "--allow_foreign_saved_model"]) == 0
    assert victim.exists()


def test_embed_uses_tf_example_by_default(exported, tmp_path):
    recs = str(tmp_path / "records")
    write_records(recs)
    out = str(tmp_path / "out")
    assert cli.invoke("embed", [f"--saved_model={exported}", f"--records_dir={recs}",
                                f"--out={out}", "--splits=test"]) == 0
    summary = json.load(open(os.path.join(out, embed.SUMMARY_NAME)))
    assert summary["signature"] == "tf_example" and summary["feeds"] == "records"


# --------------------------------------------------------------------------- 7: embed disk
@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EROFS])
def test_embed_full_disk_while_writing_tables_keeps_the_parts(exported, tmp_path, capsys,
                                                              monkeypatch, err):
    recs = str(tmp_path / "records")
    write_records(recs)
    out = str(tmp_path / "out")
    args = [f"--saved_model={exported}", f"--records_dir={recs}", f"--out={out}"]
    with monkeypatch.context() as m:
        failing_writes(m, out, err, when=lambda p: "_embeddings" in os.path.basename(p))
        assert cli.invoke("embed", args) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("embed: error: ")
    assert out in lines[0] and os.strerror(err) in lines[0]
    assert len(os.listdir(os.path.join(out, embed.PARTS_DIR))) == 2  # both shards kept
    assert cli.invoke("embed", args) == 0
    assert "2 shard(s) reused" in capsys.readouterr().out


def test_embed_read_only_out_is_one_line(exported, tmp_path, capsys, monkeypatch):
    recs = str(tmp_path / "records")
    write_records(recs)
    out = str(tmp_path / "out")
    os.makedirs(out)
    failing_writes(monkeypatch, out, errno.EROFS)
    assert cli.invoke("embed", [f"--saved_model={exported}", f"--records_dir={recs}",
                                f"--out={out}"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"embed: error: {out}")
    assert "Read-only file system" in lines[0]


# --------------------------------------------------------------------------- 5: evaluate
def _gene_table(path: str, genes: list[str], dim: int = 4, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(len(genes), dim)), columns=[str(i) for i in range(dim)])
    df.insert(0, "gene_symbol", genes)
    df.to_csv(path, index=False)


def _annotations(path: str, genes: list[str]) -> None:
    pd.DataFrame({"gene_symbol": genes,
                  "pattern": ["a" if i % 2 else "b" for i in range(len(genes))]}).to_csv(
        path, index=False)


def test_evaluate_duplicate_gene_row_is_an_error_naming_table_gene_and_rows(tmp_path, capsys):
    genes = [f"G{i}" for i in range(20)]
    table = str(tmp_path / "genes.csv")
    _gene_table(table, genes + ["G3"])  # G3 again on data row 21
    ann = str(tmp_path / "ann.csv")
    _annotations(ann, genes)
    args = ["--task=annotations", f"--embedding={table}", f"--annotations={ann}",
            f"--out={tmp_path / 'out'}", "--noreport", "--n_jobs=1", "--folds=2",
            "--min_group_genes=2"]
    assert cli.invoke("evaluate", args) == 1
    err = capsys.readouterr().err
    assert f"evaluate: error: {table}: gene-level table" in err
    assert "gene G3 on data rows 4, 21 (lines 5, 22 of a CSV)" in err
    assert "--average_duplicate_genes" in err
    assert cli.invoke("evaluate", args + ["--average_duplicate_genes"]) == 0
    err = capsys.readouterr().err
    assert f"evaluate: warning: {table}: averaged the rows of 1 repeated gene(s)" in err


def test_evaluate_duplicate_genes_are_averaged_only_when_asked():
    from ish_tf.data.embeddings import (
        EmbeddingTable,
        average_duplicate_genes,
        duplicate_genes,
    )

    keys = pd.DataFrame({"gene_symbol": ["A", "B", "A"]})
    t = EmbeddingTable(keys, np.array([[0.0], [5.0], [2.0]], np.float32), "t.csv")
    assert duplicate_genes(t) == [("A", [0, 2])]
    avg = average_duplicate_genes(t)
    assert avg.keys["gene_symbol"].tolist() == ["A", "B"]
    np.testing.assert_allclose(avg.values[:, 0], [1.0, 5.0])
    # Image- and donor-level tables repeat genes by design: not duplicates.
    t.keys["donor_id"] = ["d1", "d1", "d2"]
    assert duplicate_genes(t) == []


def test_evaluate_reid_with_no_answerable_query_is_an_error_not_zero(tmp_path, capsys):
    rng = np.random.default_rng(0)
    # Every gene in one donor only: nothing to find across donors.
    df = pd.DataFrame({"image_id": np.arange(8), "gene_symbol": [f"G{i // 2}" for i in range(8)],
                       "donor_id": [f"D{i // 2}" for i in range(8)]})
    for j in range(3):
        df[str(j)] = rng.normal(size=8)
    path = str(tmp_path / "images.csv")
    df.to_csv(path, index=False)
    assert cli.invoke("evaluate", ["--task=reid", f"--embedding={path}",
                                   f"--out={tmp_path / 'out'}", "--noreport"]) == 1
    cap = capsys.readouterr()
    assert "rank-1 (other donors) 0.000" not in cap.out
    assert f"evaluate: error: {path}: embedding 'images': no query is answerable" in cap.err
    assert "no gene has rows in two donors" in cap.err


def test_reid_table_unanswerable_set_reads_nan_not_zero():
    from ish_tf.data.embeddings import EmbeddingTable
    from ish_tf.evaluate.reid import reid_table

    # Two donors per gene, one image per (gene, donor): same_donor has nothing to find.
    keys = pd.DataFrame({"image_id": np.arange(6), "gene_symbol": list("AABBCC"),
                         "donor_id": ["d1", "d2"] * 3})
    t = EmbeddingTable(keys, np.random.default_rng(0).normal(size=(6, 3)).astype(np.float32))
    df = reid_table({"x": t}).set_index("candidates")
    assert np.isnan(df.loc["same_donor", "rank1"])
    assert df.loc["other_donor", "n_answerable"] == 6


# --------------------------------------------------------------------------- 6: bin/cdae
def _run_of(tmp_path, family: str) -> str:
    from ish_tf.families import ModelConfig

    run = tmp_path / f"{family}_run"
    run.mkdir()
    (run / "model_config.json").write_text(ModelConfig(model=family).to_json())
    (run / "train_config.json").write_text("{}")
    return str(run)


def test_cdae_baselines_refuses_a_triplet_run(tmp_path, capsys):
    run = _run_of(tmp_path, "triplet")
    assert cli.invoke("cdae", ["baselines", f"--run_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert f"cdae: error: {run}: a 'triplet' run" in err and "'cdae'" in err
    assert not os.path.exists(os.path.join(run, "baselines"))


def test_cdae_term_auc_refuses_a_plain_cdae_run(tmp_path, capsys):
    run = _run_of(tmp_path, "cdae")
    assert cli.invoke("cdae", ["term_auc", f"--run_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert f"cdae: error: {run}: a 'cdae' run" in err and "'cdae_supervised'" in err


def test_cdae_truncated_model_keras_is_named(tmp_path, capsys, model):
    run = _run_of(tmp_path, "cdae")
    model.save(os.path.join(run, "model.keras"))
    truncate_file(os.path.join(run, "model.keras"), 0.5)
    assert cli.invoke("cdae", ["baselines", f"--run_dir={run}"]) == 1
    err = capsys.readouterr().err
    assert f"{os.path.join(run, 'model.keras')}: unreadable or truncated" in err
    assert "File not found" not in err

"""Tests of ish_tf.embed: the SavedModel embeds TFRecord patches from their encoded bytes."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")


from ish_tf import embed  # noqa: E402
from ish_tf.data import records, shards  # noqa: E402
from ish_tf.data.embeddings import read_embedding_table  # noqa: E402
from ish_tf.export import saved_model as sm  # noqa: E402

S = 16
DIMS = [f"dim_{i:03d}" for i in range(6)]


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((S, S, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(6)(x), name="tiny")


def _patch(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (S, S, 3)).astype(np.uint8)


# (gene, gene_index, donor, split, images: {image_id: n_patches}); unequal patch counts
# make the mean over patches differ from the mean over image means.
LAYOUT = [
    ("Gad1", 0, "D1", "train", {101: 3, 102: 1}),
    ("Gad1", 0, "D2", "train", {103: 2}),
    ("Sst", 1, "D1", "train", {104: 1, 105: 4}),
    ("Vip", 2, "D2", "test", {106: 2, 107: 1}),
]


def write_records(out: str, corrupt: tuple[int, int] | None = None) -> dict:
    """Writes two shards (train, test); returns (image_id, patch_index) -> encoded bytes."""
    encoded: dict[tuple[int, int], bytes] = {}
    by_split: dict[str, list] = {}
    for gene, gi, donor, split, images in LAYOUT:
        by_split.setdefault(split, []).append((gene, gi, donor, images))
    for split, genes in by_split.items():
        with shards.ShardWriter(out, split, 0, 1) as w:
            for gene, gi, donor, images in genes:
                for image_id, n in images.items():
                    for p in range(n):
                        px = _patch(image_id * 10 + p)
                        data = (tf.io.encode_png(px) if p % 2 else tf.io.encode_jpeg(px)).numpy()
                        if corrupt == (image_id, p):
                            data = b"\xff\xd8\xff" + b"not a jpeg at all" * 4
                        encoded[(image_id, p)] = data
                        w.write(records.make_example(
                            image_encoded=data, image_height=S, image_width=S,
                            image_id=image_id, patch_index=p, x=10 * p, y=20 * p,
                            gene_symbol=gene, gene_index=gi, entrez_id=1000 + gi,
                            donor_id=donor, region="V1", study="synthetic"), gene, image_id)
        shards.update_index(out, w.info)
    return encoded


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    model = _model()
    sm.export_saved_model(model, str(base / "tiny"))
    return model, str(base / "tiny")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    return out, write_records(out)


def _keras_embeddings(model, encoded: list[bytes]) -> np.ndarray:
    images = tf.stack([tf.cast(tf.io.decode_image(d, channels=3), tf.float32) for d in encoded])
    return model(images, training=False).numpy()


@pytest.fixture(scope="module")
def result(exported, dataset, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("embed"))
    cfg = embed.EmbedConfig(saved_model=exported[1], records_dir=dataset[0], out_dir=out,
                            batch_size=4)
    return embed.embed_records(cfg), out


def test_patch_table_keys_rows_and_values(exported, dataset, result):
    model, _ = exported
    res, out = result
    table = read_embedding_table(os.path.join(out, "patch_embeddings.csv"))
    frame = pd.read_csv(os.path.join(out, "patch_embeddings.csv"))
    # No manifest in these records' index: the record keys, then dim_000 ... dim_005.
    assert list(frame.columns) == list(embed.PATCH_KEYS) + DIMS
    n = sum(sum(images.values()) for *_, images in LAYOUT)
    assert len(table) == n == res.rows["patch"] == res.patches_embedded
    assert res.dim == 6 and res.skipped == 0 and res.shards_reused == 0
    assert set(frame["split"]) == {"train", "test"}
    assert set(frame.loc[frame.gene_symbol == "Vip", "split"]) == {"test"}
    row = frame[(frame.image_id == 101) & (frame.patch_index == 2)].iloc[0]
    assert (row.x, row.y, row.entrez_id, row.donor_id, row.region) == (20, 40, 1000, "D1", "V1")
    # The served model's vectors equal the Keras model on the decoded patches.
    encoded = dataset[1]
    keys = list(zip(frame.image_id, frame.patch_index, strict=True))
    expected = _keras_embeddings(model, [encoded[k] for k in keys])
    np.testing.assert_allclose(table.values, expected, atol=1e-4)
    summary = json.load(open(os.path.join(out, embed.SUMMARY_NAME)))
    # Fed the serialized records through tf_example (same numbers as the image bytes).
    assert summary["signature"] == "tf_example" and summary["output"] == "embedding"
    assert summary["feeds"] == "records"
    assert summary["patches_per_sec"] > 0
    assert not os.path.exists(os.path.join(out, embed.PARTS_DIR))


def test_image_donor_gene_means_over_patches(result):
    _, out = result
    patch = pd.read_csv(os.path.join(out, "patch_embeddings.csv"))
    image = pd.read_csv(os.path.join(out, "image_embeddings.csv"))
    # One row per (gene, donor): named for what it is (donor_embeddings.csv before).
    donor = pd.read_csv(os.path.join(out, "gene_donor_embeddings.csv"))
    assert not os.path.exists(os.path.join(out, "donor_embeddings.csv"))
    gene = pd.read_csv(os.path.join(out, "gene_embeddings.csv"))

    assert len(image) == 7 and len(donor) == 4 and len(gene) == 3
    assert "patch_index" not in image.columns and "x" not in gene.columns
    img = image.set_index("image_id")
    assert img.loc[105, "n_patches"] == 4 and img.loc[105, "gene_symbol"] == "Sst"
    np.testing.assert_allclose(img.loc[105, DIMS].to_numpy(float),
                               patch[patch.image_id == 105][DIMS].mean().to_numpy(), atol=1e-6)

    g = gene.set_index("gene_symbol")
    for symbol in ("Gad1", "Sst", "Vip"):
        mine = patch[patch.gene_symbol == symbol]
        np.testing.assert_allclose(g.loc[symbol, DIMS].to_numpy(float),
                                   mine[DIMS].mean().to_numpy(), atol=1e-6)
        assert g.loc[symbol, "n_patches"] == len(mine)
        assert g.loc[symbol, "n_images"] == mine.image_id.nunique()
    assert g.loc["Gad1", "entrez_id"] == 1000

    d = donor.set_index(["gene_symbol", "donor_id"])
    mine = patch[(patch.gene_symbol == "Gad1") & (patch.donor_id == "D1")]
    np.testing.assert_allclose(d.loc[("Gad1", "D1"), DIMS].to_numpy(float),
                               mine[DIMS].mean().to_numpy(), atol=1e-6)
    assert d.loc[("Gad1", "D1"), "n_patches"] == 4 and d.loc[("Gad1", "D1"), "n_images"] == 2


def test_gene_from_images_averages_image_means(exported, dataset, tmp_path):
    cfg = embed.EmbedConfig(saved_model=exported[1], records_dir=dataset[0],
                            out_dir=str(tmp_path), gene_from="images",
                            levels=("image", "donor", "gene"))
    res = embed.embed_records(cfg)
    assert set(res.tables) == {"image", "donor", "gene"}
    assert not os.path.exists(tmp_path / "patch_embeddings.csv")
    image = pd.read_csv(tmp_path / "image_embeddings.csv")
    gene = pd.read_csv(tmp_path / "gene_embeddings.csv").set_index("gene_symbol")
    sst = image[image.gene_symbol == "Sst"]
    np.testing.assert_allclose(gene.loc["Sst", DIMS].to_numpy(float),
                               sst[DIMS].mean().to_numpy(), atol=1e-6)
    assert gene.loc["Sst", "n_images"] == 2 and gene.loc["Sst", "n_patches"] == 5
    # With 1 and 4 patches per image, the two definitions of a gene vector differ.
    by_patch = (sst[DIMS].to_numpy() * sst[["n_patches"]].to_numpy()).sum(0) / 5
    assert np.abs(gene.loc["Sst", DIMS].to_numpy(float) - by_patch).max() > 1e-4


def test_bad_record_is_skipped_and_reported(exported, tmp_path):
    recs = str(tmp_path / "records")
    write_records(recs, corrupt=(101, 2))
    res = embed.embed_records(embed.EmbedConfig(
        saved_model=exported[1], records_dir=recs, out_dir=str(tmp_path / "out"),
        splits=("train",), batch_size=8))
    assert res.skipped == 1
    skipped = pd.read_csv(res.skipped_path)
    assert skipped[["split", "image_id", "patch_index"]].values.tolist() == [["train", 101, 2]]
    assert skipped.loc[0, "shard"] == "train-00000-of-00001.tfrecord"
    assert "decode" in skipped.loc[0, "error"]
    patch = pd.read_csv(res.tables["patch"])
    train_n = sum(sum(images.values()) for *_, split, images in LAYOUT if split == "train")
    assert len(patch) == train_n - 1 and set(patch.split) == {"train"}


def test_interrupted_run_resumes_by_shard(exported, dataset, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    cfg = embed.EmbedConfig(saved_model=exported[1], records_dir=dataset[0], out_dir=out)
    real = embed.embed_shard
    calls = []

    def crash_on_second(served, path, split, *args, **kwargs):
        calls.append(os.path.basename(path))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(served, path, split, *args, **kwargs)

    monkeypatch.setattr(embed, "embed_shard", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        embed.embed_records(cfg)
    parts = os.listdir(os.path.join(out, embed.PARTS_DIR))
    assert parts == [calls[0] + ".npz"]
    assert not os.path.exists(os.path.join(out, "patch_embeddings.csv"))

    monkeypatch.setattr(embed, "embed_shard", real)
    res = embed.embed_records(cfg)
    assert res.shards_reused == 1
    fresh = embed.embed_records(embed.EmbedConfig(
        saved_model=exported[1], records_dir=dataset[0], out_dir=str(tmp_path / "fresh")))
    assert fresh.shards_reused == 0
    a = pd.read_csv(res.tables["patch"])
    b = pd.read_csv(fresh.tables["patch"])
    pd.testing.assert_frame_equal(a, b)


def test_errors_name_the_problem(exported, dataset, tmp_path, monkeypatch):
    base = dict(saved_model=exported[1], records_dir=dataset[0], out_dir=str(tmp_path))
    from ish_tf.data import embeddings as E

    monkeypatch.setattr(E, "_installed", lambda module: False)
    # A missing optional package names the extra that installs it.
    with pytest.raises(embed.EmbedError, match=r"pyarrow.*pip install 'ish_tf\[parquet\]'"):
        embed.EmbedConfig(**base, table_format="parquet").validate()
    with pytest.raises(embed.EmbedError, match=r"anndata.*pip install 'ish_tf\[expression\]'"):
        embed.EmbedConfig(**base, table_format="h5ad").validate()
    monkeypatch.undo()
    with pytest.raises(embed.EmbedError, match="validation"):
        embed.embed_records(embed.EmbedConfig(**base, splits=("validation",)))
    with pytest.raises(embed.EmbedError, match="no signature 'nope'"):
        embed.embed_records(embed.EmbedConfig(**base, signature="nope"))
    with pytest.raises(embed.EmbedError, match="one tf.string input"):
        embed.embed_records(embed.EmbedConfig(**base, signature="embed_images"))
    with pytest.raises(embed.EmbedError, match="no output 'code'"):
        embed.embed_records(embed.EmbedConfig(**base, output="code"))
    with pytest.raises(embed.EmbedError, match="run bin/export"):
        embed.embed_records(embed.EmbedConfig(**{**base, "saved_model": str(tmp_path)}))
    with pytest.raises(embed.EmbedError, match="gene_from"):
        embed.EmbedConfig(**base, gene_from="donors").validate()


def test_cli_embed(exported, dataset, tmp_path, capsys):
    from ish_tf import cli

    out = str(tmp_path / "out")
    assert cli.invoke("embed", [f"--saved_model={exported[1]}", f"--records_dir={dataset[0]}",
                                f"--out={out}", "--splits=test", "--levels=patch,gene",
                                f"--projector_dir={tmp_path / 'projector'}"]) == 0
    text = capsys.readouterr().out
    assert "gene" in text and os.path.join(out, "gene_embeddings.csv") in text
    # --projector_dir: the gene table as a TensorBoard projector view, one row per gene.
    assert f"projector: 1 genes -> tensorboard --logdir {tmp_path / 'projector'}" in text
    rows = [line.split("\t") for line in
            open(tmp_path / "projector" / "metadata.tsv").read().splitlines()]
    assert rows[0][0] == "gene_symbol" and [r[0] for r in rows[1:]] == ["Vip"]
    assert "embedding" in open(tmp_path / "projector" / "projector_config.pbtxt").read()
    gene = pd.read_csv(os.path.join(out, "gene_embeddings.csv"))
    assert gene.gene_symbol.tolist() == ["Vip"]
    assert sorted(os.listdir(out)) == ["embed_summary.json", "flags.cfg",
                                       "gene_embeddings.csv", "patch_embeddings.csv",
                                       "skipped.csv"]
    assert "--saved_model=" in open(os.path.join(out, "flags.cfg")).read()
    assert cli.invoke("embed", [f"--saved_model={exported[1]}", f"--records_dir={tmp_path}/none",
                                f"--out={out}"]) == 1
    assert "index.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- tables for downstream use
def _lab_manifest(path, leave_out: tuple[int, ...] = ()) -> str:
    """A lab's manifest of the LAYOUT images with columns of its own: a donor's age, a
    per-image stain batch, a gene-level probe set (minus the images `leave_out`)."""
    from ish_tf.data.manifest import write_manifest

    rows = []
    for gene, _, donor, _, images in LAYOUT:
        for image_id in images:
            if image_id in leave_out:
                continue
            rows.append({"image_id": image_id, "experiment_id": 9, "study": "lab",
                         "gene_symbol": gene, "donor_id": donor, "width": S, "height": S,
                         "path": f"img/{image_id}.png",
                         "donor_age": {"D1": 41.0, "D2": 52.0}[donor],
                         "stain_batch": f"B{image_id % 2}", "probe_set": f"P-{gene}",
                         "entrez_id": None if gene == "Vip" else 1000})
    write_manifest(pd.DataFrame(rows), str(path))
    return str(path)


def test_lab_manifest_columns_join_every_level(exported, dataset, tmp_path):
    manifest = _lab_manifest(tmp_path / "manifest.csv")
    res = embed.embed_records(embed.EmbedConfig(
        saved_model=exported[1], records_dir=dataset[0], out_dir=str(tmp_path / "out"),
        manifest=manifest, levels=("patch", "image", "gene_donor", "gene")))
    assert {"stain_batch", "probe_set", "donor_age", "path"} <= set(res.manifest_columns)
    assert res.manifest_note == ""
    patch = pd.read_csv(res.tables["patch"])
    dims = [c for c in patch.columns if c.startswith("dim_")]
    assert dims == DIMS and patch.columns[-1] == "dim_005"
    assert list(patch.columns[:10]) == list(embed.PATCH_KEYS)
    assert set(patch.loc[patch.image_id == 105, "stain_batch"]) == {"B1"}
    assert os.path.isabs(patch["path"].iloc[0])
    image = read_embedding_table(res.tables["image"])
    # Numeric metadata (donor_age, experiment_id) is metadata, not dimensions.
    assert image.dim == 6 and {"donor_age", "experiment_id"} <= set(image.keys.columns)
    assert os.path.basename(res.tables["donor"]) == "gene_donor_embeddings.csv"
    gd = pd.read_csv(res.tables["donor"]).set_index(["gene_symbol", "donor_id"])
    # Each level keeps the columns constant within its rows: a donor's age per (gene,
    # donor), a gene's probe set per gene; a per-image stain batch only per image.
    assert gd.loc[("Gad1", "D2"), "donor_age"] == 52.0 and "stain_batch" not in gd.columns
    gene = pd.read_csv(res.tables["gene"]).set_index("gene_symbol")
    assert gene.loc["Sst", "probe_set"] == "P-Sst" and "donor_age" not in gene.columns
    assert gene.loc["Sst", "entrez_id"] == 1001  # the records' id


def test_unknown_entrez_id_is_empty_not_minus_one():
    keys = pd.DataFrame({"image_id": [1, 2], "patch_index": 0, "x": 0, "y": 0,
                         "gene_symbol": ["A", "B"], "entrez_id": [-1, 7], "donor_id": "D",
                         "region": ["", "V1"], "study": "s", "split": "test"})
    out, added, lacking = embed.with_manifest(keys, None)
    assert out["entrez_id"].isna().tolist() == [True, False] and out["entrez_id"][1] == 7
    assert out["region"].isna().tolist() == [True, False]
    assert added == [] and lacking == 0
    # An image the manifest lacks keeps its row, with empty manifest columns, and is counted.
    manifest = pd.DataFrame({"image_id": [2, 3], "stain_batch": ["B1", "B2"]})
    out, added, lacking = embed.with_manifest(keys, manifest)
    assert added == ["stain_batch"] and lacking == 1
    assert out["stain_batch"].isna().tolist() == [True, False]


def test_h5ad_tables_open_in_anndata_with_metadata_in_obs(exported, dataset, tmp_path,
                                                         capsys):
    anndata = pytest.importorskip("anndata")
    from ish_tf import cli

    manifest = _lab_manifest(tmp_path / "manifest.csv")
    out = tmp_path / "out"
    assert cli.invoke("embed", [f"--saved_model={exported[1]}", f"--records_dir={dataset[0]}",
                                f"--out={out}", "--table_format=h5ad",
                                f"--manifest={manifest}"]) == 0
    printed = capsys.readouterr()
    assert "manifest column(s) from" in printed.out
    assert sorted(p for p in os.listdir(out) if p.endswith(".h5ad")) == [
        "gene_donor_embeddings.h5ad", "gene_embeddings.h5ad", "image_embeddings.h5ad",
        "patch_embeddings.h5ad"]
    adata = anndata.read_h5ad(out / "image_embeddings.h5ad")
    assert adata.n_obs == 7 and adata.obsm["X_triplet"].shape == (7, 6)
    assert {"gene_symbol", "donor_id", "split", "stain_batch", "donor_age",
            "n_patches"} <= set(adata.obs.columns)
    assert adata.obs.loc["105", "stain_batch"] == "B1"
    gd = anndata.read_h5ad(out / "gene_donor_embeddings.h5ad")
    assert "Gad1/D1" in gd.obs_names
    # bin/evaluate reads it like a CSV table, metadata and all.
    table = read_embedding_table(str(out / "image_embeddings.h5ad"))
    assert table.dim == 6 and "stain_batch" in table.keys.columns
    csv = embed.embed_records(embed.EmbedConfig(
        saved_model=exported[1], records_dir=dataset[0], out_dir=str(tmp_path / "csv"),
        manifest=manifest, levels=("image",)))
    np.testing.assert_allclose(table.values, read_embedding_table(csv.tables["image"]).values,
                               atol=1e-6)


def test_embed_images_from_files_and_arrays(exported, dataset, tmp_path):
    anndata = pytest.importorskip("anndata")
    model, path = exported
    arrays = [_patch(1), _patch(2), _patch(3)[:, :, 0]]
    files = []
    for i, a in enumerate(arrays[:2]):
        f = tmp_path / f"p{i}.png"
        f.write_bytes(tf.io.encode_png(a).numpy())
        files.append(str(f))
    from_files = embed.embed_images(path, files, batch_size=1)
    assert list(from_files.columns) == ["image"] + DIMS and from_files["image"].tolist() == files
    expected = model(np.stack(arrays[:2]).astype(np.float32), training=False).numpy()
    np.testing.assert_allclose(from_files[DIMS].to_numpy(), expected, atol=1e-4)
    from_arrays = embed.embed_images(path, arrays, ids=["a", "b", "grey"])
    np.testing.assert_allclose(from_arrays[DIMS].to_numpy()[:2], expected, atol=1e-4)
    assert from_arrays["image"].tolist() == ["a", "b", "grey"]
    adata = embed.embed_images(path, files, as_anndata=True)
    assert isinstance(adata, anndata.AnnData) and adata.obsm["X_triplet"].shape == (2, 6)
    with pytest.raises(embed.EmbedError, match=r"image 1 \(.*nope.png\): cannot read"):
        embed.embed_images(path, [files[0], str(tmp_path / "nope.png")])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(embed.EmbedError, match=r"image 1 \(.*bad.png\): the model cannot"):
        embed.embed_images(path, [files[0], str(bad)])

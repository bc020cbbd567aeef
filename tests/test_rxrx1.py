"""RxRx1 plates: synthetic plates, the three layouts' ingest, TFRecords, plate records and
per-plate normalisation (ish_tf.data.synthetic_plates, rxrx1, plate_records, plate_norm)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest

from ish_tf.data import plate_norm, plate_records, records, rxrx1, shards
from ish_tf.data.rxrx1 import Rxrx1Error, Rxrx1IngestConfig, ingest_rxrx1
from ish_tf.data.synthetic_plates import PlateSynthConfig, generate_plates, well_features

SMALL = PlateSynthConfig(cell_types=2, experiments=2, test_experiments=1, plates=1,
                         class_groups=2, classes_per_group=4, positive_controls=1, sites=2,
                         site_size=32, seed=5)


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("plates"))
    return root, generate_plates(root, SMALL)


@pytest.fixture(scope="module")
def ingested(plates, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("manifest"))
    return ingest_rxrx1(Rxrx1IngestConfig(images=plates[0], out=out))


@pytest.fixture(scope="module")
def extracted(ingested, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("records"))
    cfg = plate_records.PlateExtractConfig(manifest=ingested.manifest_path, out_dir=out,
                                           site_size=16, num_shards=2)
    return cfg, plate_records.extract_plates(cfg)


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


# --------------------------------------------------------------------------- synthetic
def test_synth_is_deterministic_and_writes_the_challenge_layout(plates, tmp_path):
    root, result = plates
    cfg = PlateSynthConfig(**{**SMALL.__dict__, "cell_types": 1, "test_experiments": 0})
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_plates(a, cfg)
    generate_plates(b, cfg)
    generate_plates(c, PlateSynthConfig(**{**cfg.__dict__, "seed": 6}))
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb and len(fa) == 2 * 6 * 2 * 6 + 6  # 2 exps x 6 wells x 2 sites x 6 ch + tables
    assert fa["train/HEPG2-01/Plate1/B02_s1_w1.png"] != fc["train/HEPG2-01/Plate1/B02_s1_w1.png"]

    truth = result.truth
    assert sorted(result.experiments) == ["HEPG2-01", "HEPG2-02", "HEPG2-03", "HUVEC-01",
                                          "HUVEC-02", "HUVEC-03"]
    assert result.experiments["HEPG2-03"] == "test" and result.n_classes == 8 + 1 + 1
    for (_, _), plate in truth.groupby(["experiment", "plate"]):
        treat = plate[plate["well_type"] == "treatment"]
        group = treat["class_group"].iloc[0]
        # One class group per plate, each of its siRNAs once; every control once.
        assert sorted(treat["sirna"]) == list(range(4 * group, 4 * group + 4))
        assert sorted(plate.loc[plate["well_type"] != "treatment", "sirna"]) == [8, 9]
    train = pd.read_csv(os.path.join(root, "train.csv"))
    test = pd.read_csv(os.path.join(root, "test.csv"))
    assert "sirna" not in test.columns and len(test) == 2 * 4
    merged = train.merge(truth, on="id_code", suffixes=("", "_truth"))
    assert len(merged) == len(train) and (merged["sirna"] == merged["sirna_truth"]).all()
    controls = pd.read_csv(os.path.join(root, "test_controls.csv"))
    assert set(controls["well_type"]) == {"positive_control", "negative_control"}


def test_synth_noise_defeats_raw_intensities_but_not_plate_normalisation(tmp_path):
    # The generator's promise, measured with a nearest-class-centroid classifier of
    # per-channel statistics, each of the three experiments held out in turn (fixed
    # seed: the figures are deterministic).
    cfg = PlateSynthConfig(cell_types=1, experiments=3, test_experiments=0, plates=2,
                           class_groups=2, classes_per_group=8, positive_controls=1,
                           site_size=32, seed=3)
    result = generate_plates(str(tmp_path), cfg)
    images, meta = [], []
    for w in result.truth.itertuples():
        for s in (1, 2):
            images.append(rxrx1.load_site(
                [str(tmp_path / w.dataset / w.experiment / f"Plate{w.plate}" /
                     f"{w.well}_s{s}_w{c}.png") for c in range(1, 7)]).astype(float))
            meta.append((w.experiment, w.plate, w.sirna))
    x = np.stack(images)
    exp, plate, y = (np.array(v) for v in zip(*meta, strict=True))
    normed = x.copy()
    for key in set(zip(exp, plate, strict=True)):
        m = (exp == key[0]) & (plate == key[1])
        normed[m] = (x[m] - x[m].mean((0, 1, 2))) / x[m].std((0, 1, 2))
    acc = {}
    for name, data in (("raw", x), ("normalised", normed)):
        features = well_features(list(data))
        folds = []
        for held in sorted(set(exp)):
            test = exp == held
            f = (features - features[~test].mean(0)) / (features[~test].std(0) + 1e-9)
            classes = np.unique(y[~test])
            centroids = np.stack([f[~test][y[~test] == c].mean(0) for c in classes])
            pred = classes[np.argmin(((f[test][:, None] - centroids[None]) ** 2).sum(-1), 1)]
            folds.append(float((pred == y[test]).mean()))
        acc[name] = float(np.mean(folds))
    chance = 1 / cfg.n_classes  # 0.056
    assert acc["normalised"] >= 8 * chance, acc        # measured 0.567
    assert acc["raw"] <= acc["normalised"] / 2, acc    # measured 0.183


# --------------------------------------------------------------------------- ingest
def test_ingest_challenge_layout(plates, ingested):
    df = ingested.manifest
    assert ingested.layout == "challenge" and ingested.skipped_path is None
    assert len(df) == 6 * 6 * 2 and list(df["image_id"]) == list(range(len(df)))
    assert set(df["cell_type"]) == {"HEPG2", "HUVEC"}
    test_treat = df[(df["dataset"] == "test") & (df["well_type"] == "treatment")]
    assert test_treat["sirna"].isna().all() and len(test_treat) == 2 * 4 * 2
    assert df.loc[df["dataset"] == "train", "sirna"].notna().all()
    truth = plates[1].truth.set_index("id_code")
    labelled = df[df["sirna"].notna()]
    assert (labelled["sirna"].to_numpy() == truth.loc[labelled["id_code"], "sirna"].to_numpy()).all()
    again = rxrx1.read_manifest(ingested.manifest_path)
    assert rxrx1.is_rxrx1_manifest(ingested.manifest_path)
    paths = rxrx1.channel_paths(again, ingested.manifest_path)
    site = rxrx1.load_site(paths[0])
    assert site.shape == (32, 32, 6) and site.dtype == np.uint8


def test_ingest_labels_table_fills_test_wells(plates, tmp_path):
    root, _ = plates
    result = ingest_rxrx1(Rxrx1IngestConfig(images=root, out=str(tmp_path),
                                            labels=os.path.join(root, "truth.csv")))
    assert result.manifest["sirna"].notna().all()


def test_ingest_skips_missing_unreadable_and_unlisted_images(plates, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(plates[0], root)
    folder = os.path.join(root, "train", "HEPG2-01", "Plate1")
    os.remove(os.path.join(folder, "B02_s1_w3.png"))
    with open(os.path.join(folder, "B03_s2_w5.png"), "wb") as f:
        f.write(b"not a png at all, just text bytes")
    for c in range(1, 7):  # a site no table lists
        shutil.copy(os.path.join(folder, f"B04_s1_w{c}.png"), os.path.join(folder,
                                                                          f"O23_s1_w{c}.png"))
    for name in os.listdir(folder):
        if name.startswith("B05_"):
            os.remove(os.path.join(folder, name))
    result = ingest_rxrx1(Rxrx1IngestConfig(images=root, out=str(tmp_path / "out")))
    skipped = pd.read_csv(result.skipped_path)
    reasons = dict(zip(skipped["kind"] + ":" + skipped["well"].astype(str), skipped["reason"], strict=True))
    assert reasons["missing:B02"] == "missing channel(s) w3"
    assert "unreadable channel w5" in reasons["unreadable:B03"]
    assert "not a PNG" in reasons["unreadable:B03"]
    assert "no images of well B05" in reasons["missing:B05"]
    assert "no_metadata:O23" in reasons
    assert len(result.manifest) == 72 - 1 - 1 - 2


def test_ingest_errors_name_file_line_and_column(plates, tmp_path):
    root = str(tmp_path / "bad")
    shutil.copytree(plates[0], root)
    path = os.path.join(root, "train.csv")
    table = pd.read_csv(path, dtype=str)
    table.loc[2, "plate"] = "two"
    table.to_csv(path, index=False)
    with pytest.raises(Rxrx1Error, match=r"train\.csv: line 4: column 'plate' must be an "
                                         r"integer, got 'two'"):
        ingest_rxrx1(Rxrx1IngestConfig(images=root, out=str(tmp_path / "o")))
    table.drop(columns=["sirna"]).to_csv(path, index=False)
    with pytest.raises(Rxrx1Error, match=r"train\.csv: missing column\(s\) 'sirna'"):
        ingest_rxrx1(Rxrx1IngestConfig(images=root, out=str(tmp_path / "o")))
    os.remove(path)
    controls = os.path.join(root, "train_controls.csv")
    table = pd.read_csv(controls)
    table.loc[0, "well_type"] = "blank"
    table.to_csv(controls, index=False)
    with pytest.raises(Rxrx1Error, match=r"train_controls\.csv: line 2: column 'well_type' "
                                         r"is 'blank'"):
        ingest_rxrx1(Rxrx1IngestConfig(images=root, out=str(tmp_path / "o")))
    with pytest.raises(Rxrx1Error, match="no RxRx1 layout found"):
        ingest_rxrx1(Rxrx1IngestConfig(images=str(tmp_path / "o"), out=str(tmp_path / "p")))


def test_ingest_released_layout(plates, ingested, tmp_path):
    src = ingested.manifest
    root = tmp_path / "released"
    rows = []
    for r in src.itertuples():
        folder = root / "images" / r.experiment / f"Plate{r.plate}"
        folder.mkdir(parents=True, exist_ok=True)
        for c, p in enumerate(rxrx1.channel_paths(src.iloc[[r.Index]],
                                                  ingested.manifest_path)[0], 1):
            os.link(p, folder / f"{r.well}_s{r.site}_w{c}.png")
        sirna = plates[1].truth.set_index("id_code").loc[r.id_code, "sirna"]
        rows.append({"site_id": r.site_id, "well_id": r.id_code, "cell_type": r.cell_type,
                     "dataset": r.dataset, "experiment": r.experiment, "plate": r.plate,
                     "well": r.well, "site": r.site, "well_type": r.well_type,
                     "sirna": f"s{1000 + sirna}", "sirna_id": sirna})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    result = ingest_rxrx1(Rxrx1IngestConfig(images=str(root), out=str(tmp_path / "out")))
    df = result.manifest
    assert result.layout == "released" and len(df) == len(src) and result.skipped_path is None
    assert df["sirna"].notna().all() and (df["sirna_name"] == "s" + (1000 + df["sirna"]).astype(str)).all()
    assert (df["site_id"].to_numpy() == src["site_id"].to_numpy()).all()


# --------------------------------------------------------------------------- TFRecords
def test_tfrecords_reader_and_ingest(tmp_path):
    import tensorflow as tf

    rng = np.random.default_rng(0)
    sites = [dict(image=rng.integers(0, 256, (16, 16, 6), dtype=np.uint8), experiment="RPE-01",
                  plate=2, well=f"C0{i + 2}", site=1, well_type="treatment", sirna=i)
             for i in range(3)]
    sites[2]["sirna"] = None  # unlabelled: the feature is left out, as rxrx1-utils does
    (tmp_path / "tf" / "train").mkdir(parents=True)
    options = tf.io.TFRecordOptions(compression_type="GZIP")
    with tf.io.TFRecordWriter(str(tmp_path / "tf" / "train" / "001.tfrecord"), options) as w:
        for s in sites:
            w.write(rxrx1.make_tfrecord_example(**s))
    with tf.io.TFRecordWriter(str(tmp_path / "tf" / "train" / "002.tfrecord"), options) as w:
        w.write(rxrx1.make_tfrecord_example(**sites[0]))  # the same site again
    got = list(rxrx1.read_tfrecords(str(tmp_path / "tf" / "train" / "001.tfrecord")))
    assert [i for i, _ in got] == [0, 1, 2] and got[2][1]["sirna"] is None
    assert got[0][1]["cell_type"] == "RPE" and got[1][1]["plate"] == 2
    np.testing.assert_array_equal(got[1][1]["image"], sites[1]["image"])

    result = ingest_rxrx1(Rxrx1IngestConfig(images=str(tmp_path / "tf"),
                                            out=str(tmp_path / "out")))
    df = result.manifest
    assert result.layout == "tfrecords" and len(df) == 3
    assert list(df["dataset"]) == ["train"] * 3 and df["sirna"].isna().sum() == 1
    for r in df.itertuples():
        site = rxrx1.load_site(rxrx1.channel_paths(df.iloc[[r.Index]], result.manifest_path)[0])
        np.testing.assert_array_equal(site, sites[int(r.well[1:]) - 2]["image"])
    skipped = pd.read_csv(result.skipped_path)
    assert list(skipped["kind"]) == ["duplicate"] and "002.tfrecord: record 0" in skipped["source"][0]

    bad = rxrx1.make_tfrecord_example(**sites[0])
    from tensorflow.core.example import example_pb2

    example = example_pb2.Example.FromString(bad)
    example.features.feature["image"].bytes_list.value[0] = b"\0" * 100
    with pytest.raises(Rxrx1Error, match="f.tfrecord: record 4: feature 'image' holds 100 bytes"):
        rxrx1.parse_tfrecord_example(example.SerializeToString(), "f.tfrecord: record 4")
    del example.features.feature["well"]
    with pytest.raises(Rxrx1Error, match="feature 'well' is missing"):
        rxrx1.parse_tfrecord_example(example.SerializeToString(), "f.tfrecord: record 4")


# --------------------------------------------------------------------------- records
def test_records_round_trip_splits_and_stats(ingested, extracted):
    import tensorflow as tf

    cfg, summary = extracted
    index = shards.load_index(cfg.out_dir)
    info = shards.DatasetInfo.from_dict(index["dataset"])
    assert info.identity_name == "sirna" and info.group_name == "experiment"
    assert info.spec().shape == (16, 16, 6) and info.format == "raw"
    # Splits by experiment: the test dataset -> test, the last labelled of each cell type
    # -> validation.
    assert summary["experiments"] == {"train": ["HEPG2-01", "HUVEC-01"],
                                      "validation": ["HEPG2-02", "HUVEC-02"],
                                      "test": ["HEPG2-03", "HUVEC-03"]}
    assert summary["records"] == {"train": 24, "validation": 24, "test": 24}

    manifest = ingested.manifest.set_index("image_id")
    paths = rxrx1.channel_paths(ingested.manifest, ingested.manifest_path)
    keys = list(records.FEATURE_KEYS + records.OPTIONAL_KEYS)
    stored = {}
    for f in (s["file"] for s in index["shards"]):
        serialized = [r.numpy() for r in tf.data.TFRecordDataset(os.path.join(cfg.out_dir, f))]
        first = records.parse_example(serialized[0], keys)
        batch = {k: v.numpy() for k, v in tf.io.parse_example(
            serialized, records.feature_spec(keys)).items() if k != "vector"}
        images = np.frombuffer(b"".join(batch["image/encoded"]), np.uint8).reshape(-1, 16, 16, 6)
        np.testing.assert_array_equal(records.decode_image(first, spec=info.spec()), images[0])
        for i, image_id in enumerate(batch["image_id"]):
            p = {k: v[i] for k, v in batch.items()}
            row = manifest.loc[image_id]
            labelled = not pd.isna(row["sirna"])
            assert p["label"] == (int(row["sirna"]) if labelled else -1)
            assert p["gene_symbol"].decode() == (f"{int(row['sirna']):04d}" if labelled else "")
            assert (p["gene_index"] >= 0) == labelled
            assert p["donor_id"].decode() == row["experiment"] and p["plate"] == row["plate"]
            assert p["well"].decode() == row["well"] and p["site"] == row["site"]
            assert p["cell_type"].decode() == row["cell_type"]
            assert p["well_type"].decode() == row["well_type"] and p["source_size"] == 32
            expected = plate_records.downsample(rxrx1.load_site(paths[image_id]), 16)
            np.testing.assert_array_equal(images[i], expected)
            stored[int(image_id)] = (row["experiment"], int(row["plate"]), images[i])
    assert len(stored) == len(manifest)

    stats = plate_norm.read_channel_stats(cfg.out_dir)
    for (exp, plate), part in stats.groupby(["experiment", "plate"]):
        x = np.stack([im for e, p, im in stored.values() if (e, p) == (exp, plate)]).astype(float)
        np.testing.assert_allclose(part.sort_values("channel")["mean"], x.mean((0, 1, 2)),
                                   atol=1e-5)
        np.testing.assert_allclose(part.sort_values("channel")["std"], x.std((0, 1, 2)),
                                   atol=1e-5)
        assert (part["n_sites"] == len(x)).all()

    # The shared readers take plate records as they are: the plain reader and P×K.
    from ish_tf.data.pipeline import patch_dataset, pk_dataset

    x, y = next(iter(patch_dataset(cfg.out_dir, "train", batch_size=4, training=True,
                                   label_key="label")))
    assert x.shape == (4, 16, 16, 6) and (y.numpy() >= 0).all()
    x, y = next(iter(pk_dataset(cfg.out_dir, "train", P=2, K=2)))
    assert x.shape == (4, 16, 16, 6) and y.numpy()[0] == y.numpy()[1]
    # The test experiments' sites are unlabelled (no siRNA): P×K batches of them would
    # group unrelated wells under one empty identity, so the reader refuses, saying why.
    with pytest.raises(records.RecordsError, match="unlabelled"):
        pk_dataset(cfg.out_dir, "test", P=2, K=2)

    # Resuming keeps every shard; another plan in the same folder is refused.
    before = {f: os.path.getmtime(os.path.join(cfg.out_dir, f)) for f in os.listdir(cfg.out_dir)
              if f.endswith(".tfrecord")}
    plate_records.extract_plates(cfg)
    assert before == {f: os.path.getmtime(os.path.join(cfg.out_dir, f)) for f in before}
    with pytest.raises(records.RecordsError, match="another plan"):
        plate_records.extract_plates(plate_records.PlateExtractConfig(
            manifest=cfg.manifest, out_dir=cfg.out_dir, site_size=8, num_shards=2))


def test_experiment_splits_named_and_refused(ingested):
    df = ingested.manifest
    splits = plate_records.assign_experiment_splits(df, validation=["HUVEC-01"],
                                                    test=["HEPG2-02"])
    assert splits == {"HEPG2-01": "train", "HEPG2-02": "test", "HEPG2-03": "test",
                      "HUVEC-01": "validation", "HUVEC-02": "train", "HUVEC-03": "test"}
    with pytest.raises(records.RecordsError, match="names 'RPE-01', which the manifest lacks"):
        plate_records.assign_experiment_splits(df, validation=["RPE-01"])
    with pytest.raises(records.RecordsError, match="no experiment left for training"):
        plate_records.assign_experiment_splits(df, test=["HEPG2-01", "HUVEC-01"],
                                               validation=["HEPG2-02", "HUVEC-02"])


def test_normaliser_eager_in_tf_data_jitter_and_unknown_plate(extracted):
    import tensorflow as tf

    cfg, _ = extracted
    ds = plate_norm.plate_dataset(cfg.out_dir, "validation", batch_size=100, training=False)
    batch = next(iter(ds))
    x, exp, plate = batch["image"].numpy(), batch["experiment"].numpy(), batch["plate"].numpy()
    for key in set(zip(exp, plate, strict=True)):
        m = (exp == key[0]) & (plate == key[1])
        np.testing.assert_allclose(x[m].mean((0, 1, 2)), 0, atol=1e-4)
        np.testing.assert_allclose(x[m].std((0, 1, 2)), 1, atol=1e-4)
    raw = next(iter(plate_norm.plate_dataset(cfg.out_dir, "validation", batch_size=100,
                                             training=False, normalise=False)))["image"]
    norm = plate_norm.normaliser(cfg.out_dir, jitter=0.1)
    stats = plate_norm.read_channel_stats(cfg.out_dir)
    row = stats[(stats["experiment"] == exp[0].decode()) & (stats["plate"] == plate[0])]
    eager = norm(raw[0], exp[0], plate[0]).numpy()   # one site, eagerly
    np.testing.assert_allclose(eager, (raw[0].numpy() - row["mean"].to_numpy())
                               / row["std"].to_numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eager, x[0], atol=1e-5)
    # Jitter: deterministic for a seed, within +-10% of mean and std.
    seed = tf.constant([3, 4], tf.int64)
    a = norm(raw[:1], exp[:1], plate[:1], training=True, seed=seed).numpy()
    b = norm(raw[:1], exp[:1], plate[:1], training=True, seed=seed).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a[0], eager)
    # x_jittered * s*fs + m*fm = raw: recover fs and fm per channel, check the bounds.
    r0 = raw[0].numpy().reshape(-1, 6)
    aj = a[0].reshape(-1, 6)
    for c in range(6):
        slope, intercept = np.polyfit(aj[:, c], r0[:, c], 1)
        assert 0.9 - 1e-3 <= slope / row["std"].iloc[c] <= 1.1 + 1e-3
        assert 0.9 - 1e-3 <= intercept / row["mean"].iloc[c] <= 1.1 + 1e-3
    with pytest.raises(tf.errors.InvalidArgumentError, match="NOPE-01/1"):
        norm(raw[:1], tf.constant(["NOPE-01"]), plate[:1])
    train = next(iter(plate_norm.plate_dataset(cfg.out_dir, "train", batch_size=4,
                                               training=True, seed=0)))
    assert train["image"].shape == (4, 16, 16, 6) and (train["label"].numpy() >= 0).all()


def test_optional_record_keys_leave_other_records_unchanged():
    image = np.zeros((4, 4, 3), np.uint8)
    base = dict(image=image, image_id=1, gene_symbol="A", gene_index=0)
    plain = records.make_example(**base)
    assert all(k.encode() not in plain for k in records.OPTIONAL_KEYS)
    with_plate = records.make_example(**base, plate=3, well="B02", site=2, cell_type="RPE",
                                      well_type="treatment")
    assert with_plate != plain
    defaults = records.parse_example(plain, list(records.FEATURE_KEYS + records.OPTIONAL_KEYS))
    assert int(defaults["plate"]) == -1 and defaults["well"].numpy() == b""
    assert set(records.parse_example(plain)) == set(records.FEATURE_KEYS)


def test_commands_synth_ingest_extract(tmp_path, capsys):
    from ish_tf.cli import invoke

    root, man, rec = (str(tmp_path / n) for n in ("plates", "man", "rec"))
    assert invoke("synth", ["--modality=fluorescence", f"--out={root}", "--small_run",
                            "--synth_test_experiments=0", "--synth_experiments=2",
                            "--synth_sites=1"]) == 0
    assert invoke("ingest", ["--layout=rxrx1", f"--images={root}", f"--out={man}"]) == 0
    assert invoke("extract", [f"--manifest={man}/manifest.csv", f"--out={rec}",
                              "--site_size=24", "--num_shards=1"]) == 0
    out = capsys.readouterr().out
    assert "synth: 4 experiments (0 unlabelled) of 2 cell type(s)" in out
    assert "ingest: RxRx1 challenge layout: 36 sites" in out
    assert "train          18 sites" in out and "validation     18 sites" in out
    assert os.path.exists(os.path.join(rec, plate_norm.STATS_NAME))
    assert invoke("ingest", ["--layout=rxrx1", f"--images={rec}", f"--out={man}2"]) == 1


def test_relative_images_path_resolves_from_the_manifest(plates, tmp_path, monkeypatch):
    """Regression: a relative --images wrote paths bin/extract resolved against the
    manifest's folder ("No such file .../manifest/plates/train/...")."""
    from ish_tf.cli import invoke

    os.symlink(plates[0], tmp_path / "plates")
    monkeypatch.chdir(tmp_path)
    assert invoke("ingest", ["--layout=rxrx1", "--images=plates", "--out=man"]) == 0
    df = rxrx1.read_manifest(os.path.join("man", rxrx1.MANIFEST_NAME))
    first = df[rxrx1.CHANNEL_COLUMNS[0]].iloc[0]
    assert os.path.isabs(first) and first.startswith(str(tmp_path / "plates"))
    paths = rxrx1.channel_paths(df, str(tmp_path / "man" / rxrx1.MANIFEST_NAME))
    assert all(os.path.exists(p) for p in paths.ravel())
    # images below the output folder stay relative, so the folder can move as a whole
    shutil.copytree(plates[0], tmp_path / "inside" / "plates")
    assert invoke("ingest", ["--layout=rxrx1", "--images=inside/plates", "--out=inside"]) == 0
    df = rxrx1.read_manifest(os.path.join("inside", rxrx1.MANIFEST_NAME))
    assert df[rxrx1.CHANNEL_COLUMNS[0]].iloc[0].startswith("plates" + os.sep)
    shutil.move(str(tmp_path / "inside"), str(tmp_path / "moved"))
    paths = rxrx1.channel_paths(df, str(tmp_path / "moved" / rxrx1.MANIFEST_NAME))
    assert all(os.path.exists(p) for p in paths.ravel())

"""bin/extract end to end: shards, splits, report, resume after a crash, bad input."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ish_tf.data import patch_sampling as S
from ish_tf.data import patches as P
from ish_tf.data import records, shards
from ish_tf.data.manifest import ManifestError, write_manifest
from ish_tf.io_utils import tmp_path_for


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """8 genes x 2 donors x 1 image, 256x288 synthetic sections with known masks."""
    from ish_tf.data.synthetic import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("synth_extract")
    generate_dataset(SynthConfig(out_dir=str(out), n_genes=8, n_donors=2, donors_per_gene=2,
                                 images_per_gene_donor=1, height=256, width=288, seed=1))
    return out


def _cfg(manifest, out, **kw) -> P.ExtractConfig:
    base = dict(manifest=str(manifest), out_dir=str(out), patches_per_image=4, source_size=96,
                patch_size=32, min_fraction=0.9, max_tries=100, num_shards=2, seed=0)
    base.update(kw)
    return P.ExtractConfig(**base)


def _read_keys(out) -> list[tuple[int, int, str]]:
    """(image_id, patch_index, gene_symbol) of every record in every indexed shard."""
    import tensorflow as tf

    keys = []
    for shard in shards.load_index(str(out))["shards"]:
        ds = tf.data.TFRecordDataset(os.path.join(out, shard["file"]),
                                     compression_type=shard["compression"] or "")
        for raw in ds:
            f = records.parse_example(raw, ["image_id", "patch_index", "gene_symbol"])
            keys.append((int(f["image_id"]), int(f["patch_index"]),
                         f["gene_symbol"].numpy().decode()))
    return keys


def _shard_bytes(out) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))
            if ".tfrecord" in n and not n.startswith(".") and not n.endswith(".npy")}


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory):
    """An uninterrupted single-process run, the yardstick of the resume tests."""
    out = tmp_path_factory.mktemp("ref")
    summary = P.run_extract(_cfg(synth / "manifest.csv", out))
    return out, summary


def test_end_to_end_extract(synth, reference):
    out, summary = reference
    manifest = pd.read_csv(synth / "manifest.csv")
    report = pd.read_csv(out / P.REPORT_NAME)
    assert sorted(report["image_id"]) == sorted(manifest["image_id"])
    assert (report["status"] == S.OK).all(), report
    assert (report["n_patches"] == 4).all()
    keys = _read_keys(out)
    assert len(keys) == len(set(keys)) == 4 * len(manifest)
    assert summary["shards_written"] == len(shards.load_index(str(out))["shards"])
    assert sum(s["patches"] for s in summary["splits"].values()) == len(keys)
    # Splits are by gene: each gene lies in exactly one split, all three are used.
    info = shards.load_dataset_info(str(out))
    split_of = {g.gene_symbol: g.split for g in info.genes}
    assert set(split_of.values()) == {"train", "validation", "test"}
    for _, row in report.iterrows():
        assert row["split"] == split_of[row["gene_symbol"]]
    # Records are contiguous per gene inside every shard, and their labels match the vocabulary.
    for shard in shards.load_index(str(out))["shards"]:
        assert shard["split"] in shards.SPLITS
    genes_in_order = [k[2] for k in keys]
    runs = [g for i, g in enumerate(genes_in_order) if i == 0 or genes_in_order[i - 1] != g]
    assert len(runs) == len(set(runs))
    genes_csv = pd.read_csv(out / "genes.csv")
    assert genes_csv["n_patches"].sum() == len(keys)
    # A decoded patch has the stored size.
    import tensorflow as tf

    shard = shards.load_index(str(out))["shards"][0]
    raw = next(iter(tf.data.TFRecordDataset(os.path.join(out, shard["file"]))))
    f = records.parse_example(raw)
    assert tuple(records.decode_image(f, 32).shape) == (32, 32, 3)
    assert int(f["source_size"]) == 96
    assert P.format_summary(summary).startswith("extract: wrote")


def test_rerun_is_a_no_op_and_workers_give_identical_shards(synth, reference, tmp_path):
    ref_out, _ = reference
    again = P.run_extract(_cfg(synth / "manifest.csv", ref_out))
    assert again["shards_written"] == 0 and again["shards_resumed"] > 0
    out = tmp_path / "two_workers"
    P.run_extract(_cfg(synth / "manifest.csv", out, workers=2))
    assert _shard_bytes(out) == _shard_bytes(ref_out)


def test_crash_mid_shard_then_resume_gives_same_records(synth, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "crashy"
    seen: list[tuple[str, int]] = []

    def crash(split, shard, result):
        seen.append((split, shard))
        # The second image of the second shard: one shard done, one half written.
        if len(set(seen)) == 2 and seen.count((split, shard)) == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        P.run_extract(_cfg(synth / "manifest.csv", out), hooks=P.ExtractHooks(after_image=crash))
    done_before = len(shards.load_index(str(out))["shards"])
    assert 0 < done_before < len(shards.load_index(str(ref_out))["shards"])
    # A killed run leaves a temporary shard and a final-named shard the index never listed.
    pending = [n for n in _shard_bytes(ref_out)
               if n not in {s["file"] for s in shards.load_index(str(out))["shards"]}]
    stale_tmp = tmp_path_for(os.path.join(out, pending[0]))
    with open(stale_tmp, "wb") as f:
        f.write(b"\x00partial")
    with open(os.path.join(out, pending[-1]), "wb") as f:
        f.write(b"truncated")
    summary = P.run_extract(_cfg(synth / "manifest.csv", out))
    assert summary["shards_resumed"] == done_before
    assert [os.path.basename(p) for p in summary["removed_tmp"]] == [os.path.basename(stale_tmp)]
    assert not os.path.exists(stale_tmp)
    keys = _read_keys(out)
    assert len(keys) == len(set(keys))
    assert sorted(keys) == sorted(_read_keys(ref_out))
    assert _shard_bytes(out) == _shard_bytes(ref_out)
    report = pd.read_csv(out / P.REPORT_NAME)
    assert len(report) == len(pd.read_csv(ref_out / P.REPORT_NAME))


def test_bad_images_are_recorded_and_the_rest_continue(synth, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth / "images", data / "images")
    df = pd.read_csv(synth / "manifest.csv")
    ids = list(df["image_id"])
    raw = (data / "images" / f"{ids[0]}.jpg").read_bytes()
    (data / "images" / f"{ids[0]}.jpg").write_bytes(raw[: len(raw) // 4])   # truncated
    (data / "images" / f"{ids[1]}.jpg").write_bytes(b"not a jpeg at all")   # corrupt
    Image.fromarray(np.full((256, 288, 3), 245, np.uint8)).save(data / "images" / f"{ids[2]}.jpg")
    Image.fromarray(np.full((40, 50, 3), 200, np.uint8)).save(data / "images" / f"{ids[3]}.jpg")
    os.remove(data / "images" / f"{ids[4]}.jpg")                               # missing
    write_manifest(df, str(data / "manifest.csv"))
    # The bad images leave the validation split without patches: an error by default
    # (issue 21), a warning when allowed; the rerun resumes the shards already written.
    with pytest.raises(P.ExtractError, match="validation.*hold no patches.*balanced"):
        P.run_extract(_cfg(data / "manifest.csv", tmp_path / "out"))
    summary = P.run_extract(_cfg(data / "manifest.csv", tmp_path / "out",
                                 allow_empty_splits=True))
    assert "validation" in P.format_summary(summary).split("warning: ")[1]
    report = pd.read_csv(tmp_path / "out" / P.REPORT_NAME).set_index("image_id")
    expected = {ids[0]: S.UNREADABLE, ids[1]: S.UNREADABLE, ids[2]: S.NO_TISSUE,
                ids[3]: S.TOO_SMALL, ids[4]: S.UNREADABLE}
    for image_id, status in expected.items():
        assert report.loc[image_id, "status"] == status, report.loc[image_id]
        assert report.loc[image_id, "n_patches"] == 0
    assert "file not found" in report.loc[ids[4], "reason"]
    assert f"{ids[1]}.jpg" in report.loc[ids[1], "reason"]
    rest = report.drop(index=list(expected))
    assert (rest["status"] == S.OK).all()
    assert len(_read_keys(tmp_path / "out")) == 4 * len(rest)
    assert summary["skipped"] == {S.UNREADABLE: 3, S.NO_TISSUE: 1, S.TOO_SMALL: 1}


def test_bad_manifests_and_gene_lists(synth, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ManifestError, match="not found"):
        P.run_extract(_cfg(tmp_path / "nope.csv", out))
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"\xff\xfe\x00garbage\x00\xff")
    with pytest.raises(ManifestError, match="bad.csv"):
        P.run_extract(_cfg(bad, out))
    df = pd.read_csv(synth / "manifest.csv")
    df.drop(columns=["gene_symbol"]).to_csv(tmp_path / "nogene.csv", index=False)
    with pytest.raises(ManifestError, match="gene_symbol"):
        P.run_extract(_cfg(tmp_path / "nogene.csv", out))
    df.iloc[:0].to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(P.ExtractError, match="empty gene list"):
        P.run_extract(_cfg(tmp_path / "empty.csv", out))
    with pytest.raises(P.ExtractError, match="NOPE"):
        P.run_extract(_cfg(synth / "manifest.csv", out, genes=("NOPE",)))
    assert not os.path.exists(out / "index.json")


def test_resume_with_other_settings_is_refused(synth, reference):
    ref_out, _ = reference
    before = _shard_bytes(ref_out)
    with pytest.raises(P.ExtractError, match="source_size"):
        P.run_extract(_cfg(synth / "manifest.csv", ref_out, source_size=64))
    assert _shard_bytes(ref_out) == before


def test_split_by_donor_and_gene_filter(synth, tmp_path):
    out = tmp_path / "donor"
    df = pd.read_csv(synth / "manifest.csv")
    genes = tuple(sorted(df["gene_symbol"].unique())[:4])
    cfg = _cfg(synth / "manifest.csv", out, split_by="donor", genes=genes,
               split_fractions=(0.5, 0.5, 0.0), image_format="png", compression="GZIP")
    P.run_extract(cfg)
    info = shards.load_dataset_info(str(out))
    assert info.split_by == "donor" and set(info.donor_splits.values()) == {"train", "validation"}
    report = pd.read_csv(out / P.REPORT_NAME)
    assert set(report["gene_symbol"]) == set(genes)
    for _, row in report.iterrows():
        assert row["split"] == info.donor_splits[row["donor_id"]]
    assert all(s["file"].endswith(".gz") for s in shards.load_index(str(out))["shards"])
    assert len(_read_keys(out)) == 4 * len(report)


def test_cli_main(synth, tmp_path, capsys):
    from ish_tf import cli

    out = tmp_path / "cli"
    argv = [f"--manifest={synth / 'manifest.csv'}", f"--out={out}",
            "--patches_per_image=2", "--source_size=96", "--patch_size=32", "--num_shards=1",
            "--genes=" + ",".join(sorted(pd.read_csv(synth / "manifest.csv")["gene_symbol"])[:3]),
            "--save_overlays", "--allow_empty_splits"]
    assert cli.invoke("extract", argv) == 0
    printed = capsys.readouterr().out
    assert "extract: wrote" in printed and str(out) in printed
    assert os.path.exists(out / "extract_flags.cfg")
    # --save_overlays: one mask overlay per extracted image, the image's size.
    report = pd.read_csv(out / P.REPORT_NAME)
    ok = report[report["status"] == S.OK]
    assert len(ok) > 0
    assert sorted(os.listdir(out / "overlays")) == sorted(f"{i}.png" for i in ok["image_id"])
    with Image.open(out / "overlays" / f"{ok['image_id'].iloc[0]}.png") as im:
        assert im.mode == "RGB" and im.size[0] > 0
    assert cli.invoke("extract", [f"--manifest={tmp_path / 'missing.csv'}", f"--out={out}"]) == 1
    assert "missing.csv" in capsys.readouterr().err


def test_fluorescence_sections_with_a_dark_background(synth, tmp_path):
    """`--mask_background=dark`: fluorescence sections (tissue emitting light on black) give
    patches on the tissue; the brightfield default would take the black slide for tissue."""
    import tensorflow as tf
    from test_segment import _fluorescence

    from ish_tf.data.segment import MaskConfig

    df = pd.read_csv(synth / "manifest.csv").head(6)
    truths = {}
    for i, row in df.iterrows():
        truth = np.asarray(Image.open(synth / "masks" / f"{row['image_id']}.png")) > 127
        truths[int(row["image_id"])] = truth
        path = tmp_path / f"fluo_{row['image_id']}.png"
        Image.fromarray(_fluorescence(truth, i)).save(path)
        df.loc[i, "path"] = str(path)
    write_manifest(df, str(tmp_path / "manifest.csv"))
    out = tmp_path / "records"
    cfg = _cfg(tmp_path / "manifest.csv", out, min_fraction=1.0,
               mask=MaskConfig(background="dark"))
    from ish_tf import cli
    from ish_tf.cli import extract as extract_cli

    fv = cli.parse("extract", [f"--manifest={tmp_path / 'manifest.csv'}", f"--out={out}",
                               "--mask_background=dark"])
    assert extract_cli.extract_config(fv).mask == cfg.mask
    assert P.check_background(P.select_images(cfg), cfg) is None
    P.run_extract(cfg)
    report = pd.read_csv(out / P.REPORT_NAME)
    assert (report["status"] == S.OK).all(), list(report["reason"])
    n = 0
    for shard in shards.load_index(str(out))["shards"]:
        for raw in tf.data.TFRecordDataset(os.path.join(out, shard["file"])):
            f = records.parse_example(raw, ["image_id", "x", "y"])
            x, y, truth = int(f["x"]), int(f["y"]), truths[int(f["image_id"])]
            assert truth[y:y + 96, x:x + 96].mean() > 0.97  # on the tissue, not the black slide
            n += 1
    assert n == 4 * len(df)
    # The setting is part of the record set's key: resuming with the default is refused, and
    # the default's key is the one record sets written before the option carry.
    with pytest.raises(P.ExtractError, match="mask"):
        P.run_extract(_cfg(tmp_path / "manifest.csv", out, min_fraction=1.0))
    # With the brightfield default the black slide would be "tissue": a warning says so,
    # naming the images; brightfield sections with the dark setting are warned of too.
    bright = _cfg(tmp_path / "manifest.csv", tmp_path / "bright")
    warning = P.check_background(P.select_images(bright), bright)
    assert "5 of 5 images sampled look like sections on a dark background" in warning
    assert "fluo_" in warning and "--mask_background=dark" in warning
    brightfield = _cfg(synth / "manifest.csv", tmp_path / "bf", mask=MaskConfig(background="dark"))
    assert "--mask_background=bright" in P.check_background(P.select_images(brightfield),
                                                            brightfield)
    assert P.check_background(P.select_images(_cfg(synth / "manifest.csv", tmp_path / "bf2")),
                              _cfg(synth / "manifest.csv", tmp_path / "bf2")) is None
    assert cfg.sampling_key()["mask"]["background"] == "dark"
    assert "background" not in _cfg(tmp_path / "manifest.csv", out).sampling_key()["mask"]


# --------------------------------------------------------------------------- reliability
def _copy_dataset(synth, dest):
    shutil.copytree(synth, dest)
    return dest


def _indexed_shards(out) -> list:
    return shards.load_index(str(out), missing_ok=True)["shards"]


def test_extract_missing_images_dir_is_an_error_not_permanent_loss(synth, reference, tmp_path):
    data = _copy_dataset(synth, tmp_path / "data")
    os.rename(data / "images", data / "images.away")  # a mount that is not there yet
    out = tmp_path / "out"
    with pytest.raises(P.ExtractError, match=r"/images: the images directory does not exist.*16 image"):
        P.run_extract(_cfg(data / "manifest.csv", out))
    assert _indexed_shards(out) == []
    os.rename(data / "images.away", data / "images")  # the fault passes: nothing was lost
    summary = P.run_extract(_cfg(data / "manifest.csv", out))
    assert summary["shards_resumed"] == 0
    assert len(_read_keys(out)) == len(_read_keys(reference[0])) == 4 * 16


def test_extract_every_image_unreadable_is_an_error(synth, tmp_path):
    from faults import flip_bytes

    data = _copy_dataset(synth, tmp_path / "data")
    for name in os.listdir(data / "images"):
        flip_bytes(str(data / "images" / name), count=4, end=4)
    out = tmp_path / "out"
    with pytest.raises(P.ExtractError, match=r"every one of the 16 image\(s\) of .*manifest.csv "
                                             r"was unreadable \(first: .*cannot decode"):
        P.run_extract(_cfg(data / "manifest.csv", out))
    assert _indexed_shards(out) == [] and not _shard_bytes(out)
    shutil.rmtree(data / "images")
    shutil.copytree(synth / "images", data / "images")
    P.run_extract(_cfg(data / "manifest.csv", out))
    assert len(_read_keys(out)) == 4 * 16


def _flaky_reads(monkeypatch, image_id: int, failures: int) -> list[str]:
    """read_rgb of `image_id` fails with EIO `failures` times (then reads); returns the calls."""
    import errno

    calls: list[str] = []
    real = S.read_rgb

    def read(path, *args):
        if os.path.basename(path) == f"{image_id}.jpg":
            calls.append(path)
            if len(calls) <= failures:
                raise OSError(errno.EIO, "Input/output error", path)
        return real(path, *args)

    monkeypatch.setattr(S, "read_rgb", read)
    monkeypatch.setattr(S, "IO_RETRY_DELAY", 0.01)
    return calls


def test_extract_transient_io_error_is_retried(synth, reference, tmp_path, monkeypatch):
    image_id = int(pd.read_csv(synth / "manifest.csv")["image_id"].iloc[3])
    calls = _flaky_reads(monkeypatch, image_id, failures=S.IO_ATTEMPTS - 1)
    out = tmp_path / "out"
    P.run_extract(_cfg(synth / "manifest.csv", out))
    assert len(calls) == S.IO_ATTEMPTS
    report = pd.read_csv(out / P.REPORT_NAME)
    assert (report["status"] == S.OK).all()
    assert _shard_bytes(out) == _shard_bytes(reference[0])


def test_extract_persistent_io_error_stops_the_run(synth, reference, tmp_path, monkeypatch):
    image_id = int(pd.read_csv(synth / "manifest.csv")["image_id"].iloc[3])
    calls = _flaky_reads(monkeypatch, image_id, failures=10**6)
    out = tmp_path / "out"
    with pytest.raises(P.ExtractError, match=rf"{image_id}.jpg: cannot read the image "
                                             r"\(Input/output error; 3 attempts\): an I/O error"):
        P.run_extract(_cfg(synth / "manifest.csv", out))
    assert len(calls) == S.IO_ATTEMPTS
    report_path = out / P.REPORT_NAME
    if report_path.exists():  # shards done before the fault are fine; this image is not in
        assert image_id not in set(pd.read_csv(report_path)["image_id"])
    monkeypatch.undo()
    P.run_extract(_cfg(synth / "manifest.csv", out))  # the disk is back: the rerun completes
    assert _shard_bytes(out) == _shard_bytes(reference[0])


def test_extract_second_run_into_same_out_fails_at_once(synth, reference, tmp_path):
    """A second extract into a busy OUT used to delete the first one's temporary shard."""
    out = tmp_path / "out"
    seen: list[str] = []

    def second_run(split, index, res):
        if seen:
            return
        with pytest.raises(P.ExtractError, match=rf"{out}: another extract is writing there"):
            P.run_extract(_cfg(synth / "manifest.csv", out))
        seen.append("refused")

    P.run_extract(_cfg(synth / "manifest.csv", out), hooks=P.ExtractHooks(after_image=second_run))
    assert seen == ["refused"]
    assert _shard_bytes(out) == _shard_bytes(reference[0])  # the first run was not disturbed
    P.run_extract(_cfg(synth / "manifest.csv", out))  # the lock goes with the run


def test_extract_read_only_out_is_one_clear_error(synth, tmp_path, monkeypatch):
    from faults import read_only_dir

    out = tmp_path / "out"
    with read_only_dir(str(out), monkeypatch), pytest.raises(P.ExtractError) as info:
        P.run_extract(_cfg(synth / "manifest.csv", out))
    assert str(info.value).startswith(f"{out}/") and "cannot write (" in str(info.value)
    assert "\n" not in str(info.value)


def test_extract_full_disk_is_one_clear_error(synth, reference, tmp_path, monkeypatch):
    import errno

    from faults import failing_writes

    out = tmp_path / "out"
    failing_writes(monkeypatch, str(out), errno.ENOSPC, when=lambda p: ".tfrecord" in p)
    with pytest.raises(P.ExtractError, match=r"\.tfrecord.*: cannot write \(No space left on device\)"):
        P.run_extract(_cfg(synth / "manifest.csv", out))
    assert _indexed_shards(out) == []
    monkeypatch.undo()
    P.run_extract(_cfg(synth / "manifest.csv", out))  # space again: the rerun completes
    assert _shard_bytes(out) == _shard_bytes(reference[0])


def test_manifest_size_that_does_not_match_the_image_is_reported(synth, tmp_path):
    """A manifest row whose width/height differ from the image read (another file than
    listed, or rescanned since) used to pass silently; the report names it, the summary
    warns, and the image's patches are still extracted."""
    df = pd.read_csv(synth / "manifest.csv")
    df["path"] = [str(synth / p) for p in df["path"]]
    wrong = int(df["image_id"].iloc[0])
    df.loc[0, "width"] = int(df.loc[0, "width"]) * 2
    write_manifest(df, str(tmp_path / "manifest.csv"))
    out = tmp_path / "out"
    summary = P.run_extract(_cfg(tmp_path / "manifest.csv", out))
    assert summary["size_mismatch"] == [wrong]
    report = pd.read_csv(out / P.REPORT_NAME).set_index("image_id")
    assert "manifest says" in str(report.loc[wrong, "reason"])
    assert report.loc[wrong, "status"] == S.OK
    assert f"image_id {wrong}" in P.format_summary(summary)

"""bin/ingest: your own section images -> a manifest every later stage reads."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ish_tf.data import manifest
from ish_tf.data.ingest import IngestConfig, IngestError, ingest, pattern_regex, stable_id


def _image(path, size=(40, 30), value=0):
    """A white slide with a purple tissue block over its middle."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = size
    rgb = np.full((h, w, 3), 245, np.uint8)
    rgb[h // 5:h - h // 5, w // 5:w - w // 5] = (150 - value, 110, 170)
    Image.fromarray(rgb).save(path)


@pytest.fixture
def folder(tmp_path):
    """PVALB/D1_0.jpg ... with sizes that differ per file, a broken file, a stray and a note."""
    root = tmp_path / "sections"
    sizes = {"PVALB/H1_a.jpg": (40, 30), "PVALB/H2_b.png": (50, 20), "SST/H1_c.tif": (64, 48),
             "SST/H2_d.jpg": (33, 35)}
    for i, (rel, size) in enumerate(sizes.items()):
        _image(str(root / rel), size, i)
    (root / "SST" / "H1_broken.jpg").write_bytes(b"not an image")
    _image(str(root / "stray.jpg"))
    (root / "notes.txt").write_text("not an image, not listed")
    return root, sizes


def test_name_pattern_reads_columns_and_sizes_and_records_what_it_skips(folder, tmp_path):
    root, sizes = folder
    out = tmp_path / "data"
    result = ingest(IngestConfig(out=str(out), images=str(root),
                                 name_pattern="{gene_symbol}/{donor_id}_*.*", study="lab"))
    m = manifest.read_manifest(str(out / "manifest.csv"))  # the schema every stage reads
    assert len(m) == 4
    for _, row in m.iterrows():
        rel = os.path.relpath(manifest.image_path(str(out / "manifest.csv"), row["path"]), root)
        assert (row["width"], row["height"]) == sizes[rel]
        assert rel.startswith(row["gene_symbol"] + "/" + row["donor_id"] + "_")
    assert set(m["study"]) == {"lab"}
    # One experiment per (gene, donor); ids from the paths.
    assert m.groupby(["gene_symbol", "donor_id"])["experiment_id"].nunique().eq(1).all()
    assert m["experiment_id"].nunique() == 4
    assert stable_id("image", "PVALB/H1_a.jpg") in set(m["image_id"])
    skipped = pd.read_csv(result.skipped_path)
    assert dict(zip(skipped["path"], skipped["kind"], strict=True)) == {
        "stray.jpg": "no_match", "SST/H1_broken.jpg": "unreadable"}
    assert "H1_broken.jpg" in skipped.set_index("kind").loc["unreadable", "reason"]


def test_rerun_after_adding_images_keeps_ids_and_images_below_out_are_relative(folder):
    root, _ = folder
    cfg = IngestConfig(out=str(root), images=str(root), name_pattern="{gene_symbol}/{donor_id}_*.*")
    first = ingest(cfg).manifest
    assert not any(os.path.isabs(p) for p in first["path"])  # the folder moves as a whole
    (root / "SST" / "H1_broken.jpg").unlink()
    (root / "stray.jpg").unlink()
    _image(str(root / "GAD1" / "H3_e.jpg"))
    second = ingest(cfg)
    assert second.skipped_path == "" and not os.path.exists(root / "skipped.csv")
    ids = second.manifest.set_index("path")["image_id"]
    assert first.set_index("path")["image_id"].to_dict() == ids.drop("GAD1/H3_e.jpg").to_dict()
    assert len(second.manifest) == 5


def test_table_keeps_columns_types_and_own_columns_and_names_bad_lines(folder, tmp_path):
    root, sizes = folder
    table = root / "sections.csv"
    table.write_text(
        "path,gene_symbol,donor_id,donor_age,region,layer_note\n"
        "PVALB/H1_a.jpg,PVALB,H1,54,V1,deep\n"
        "PVALB/H2_b.png,PVALB,H2,61.5,MTG,\n"
        "SST/H1_c.tif,,H1,54,V1,\n"           # line 4: no gene
        "PVALB/H1_a.jpg,PVALB,H1,54,V1,\n"    # line 5: repeats line 2
        "SST/missing.jpg,SST,H1,54,V1,\n"
        "SST/H2_d.jpg, SST ,H2,61.5,V1,x\n")
    out = tmp_path / "data"
    result = ingest(IngestConfig(out=str(out), table=str(table)))
    m = manifest.read_manifest(str(out / "manifest.csv"))
    assert sorted(m["gene_symbol"]) == ["PVALB", "PVALB", "SST"]  # whitespace stripped
    assert m["donor_age"].dtype == np.float64 and set(m["donor_age"]) == {54.0, 61.5}
    assert "layer_note" in m.columns and set(m["study"]) == {"user"}
    row = m[m["gene_symbol"] == "SST"].iloc[0]
    assert (row["width"], row["height"]) == sizes["SST/H2_d.jpg"]
    kinds = result.skipped.set_index("kind")["reason"]
    assert "line 4: empty gene_symbol" in kinds["no_gene_symbol"]
    assert "line 5 repeats line 2" in kinds["duplicate"]
    assert "missing.jpg: file not found" in kinds["missing"]

    table.write_text("path,gene_symbol,donor_age\nPVALB/H1_a.jpg,PVALB,54\nSST/H2_d.jpg,SST,old\n")
    with pytest.raises(IngestError, match=r"sections.csv: column 'donor_age'.*row 3.*'old'"):
        ingest(IngestConfig(out=str(out), table=str(table)))
    table.write_text("file,gene\nPVALB/H1_a.jpg,PVALB\n")
    with pytest.raises(IngestError, match=r"sections.csv: no 'path' column \(columns: file, gene\)"):
        ingest(IngestConfig(out=str(out), table=str(table)))


def test_table_ids_paths_outside_and_no_donor(folder, tmp_path):
    root, _ = folder
    table = tmp_path / "elsewhere" / "t.csv"
    table.parent.mkdir()
    table.write_text(f"path,gene_symbol,image_id\n{root / 'PVALB' / 'H1_a.jpg'},PVALB,17\n"
                     "PVALB/H2_b.png,PVALB,18\n")
    out = tmp_path / "data"
    m = ingest(IngestConfig(out=str(out), table=str(table), images=str(root))).manifest
    assert list(m["image_id"]) == [17, 18] and set(m["donor_id"]) == {"unknown"}
    assert all(os.path.isabs(p) for p in m["path"])  # outside OUT: absolute
    table.write_text("path,gene_symbol,image_id\nPVALB/H1_a.jpg,PVALB,17\nPVALB/H2_b.png,PVALB,\n")
    with pytest.raises(IngestError, match="image_id' is filled in some rows only"):
        ingest(IngestConfig(out=str(out), table=str(table), images=str(root)))


def test_bad_configurations_and_patterns_are_named(folder, tmp_path):
    root, _ = folder
    out = str(tmp_path / "o")
    with pytest.raises(IngestError, match="exactly one of --table"):
        IngestConfig(out=out, images=str(root)).validate()
    with pytest.raises(IngestError, match="needs --images"):
        IngestConfig(out=out, name_pattern="{gene_symbol}.jpg").validate()
    with pytest.raises(IngestError, match="not a directory"):
        IngestConfig(out=out, images=str(root / "nope"), name_pattern="{gene_symbol}.jpg").validate()
    with pytest.raises(IngestError, match=r"unknown field \{gene\}"):
        pattern_regex("{gene}/x.jpg")
    with pytest.raises(IngestError, match="appears twice"):
        pattern_regex("{gene_symbol}/{gene_symbol}.jpg")
    with pytest.raises(IngestError, match="no {gene_symbol} field"):
        pattern_regex("{donor_id}/*.jpg")
    with pytest.raises(IngestError, match="no usable image"):
        ingest(IngestConfig(out=out, images=str(root), name_pattern="{gene_symbol}.bmp"))
    regex, fields = pattern_regex("**/{donor_id}-{gene_symbol}.tif")
    assert fields == ["donor_id", "gene_symbol"]
    assert regex.fullmatch("a/b/H08-0020-PVALB.tif").group("gene_symbol") == "0020-PVALB"
    assert regex.fullmatch("x/D1-PVALB.tif").groupdict() == {"donor_id": "D1", "gene_symbol": "PVALB"}
    assert regex.fullmatch("D1-PVALB.jpg") is None


def test_cli_then_extract_reads_the_manifest(folder, tmp_path, capsys):
    from ish_tf import cli
    from ish_tf.data.patches import ExtractConfig, run_extract

    root, _ = folder
    out = tmp_path / "data"
    assert cli.invoke("ingest", [f"--images={root}", "--name_pattern={gene_symbol}/{donor_id}_*.*",
                                 f"--out={out}"]) == 0
    printed = capsys.readouterr().out
    assert "4 images of 2 genes in 2 donor(s)" in printed
    assert "no_match 1" in printed and "unreadable 1" in printed
    assert os.path.exists(out / "ingest_flags.cfg")
    assert cli.invoke("ingest", [f"--images={root}", "--name_pattern={gene_symbol}.gif",
                                 f"--out={out}"]) == 1
    assert "no usable image" in capsys.readouterr().err
    run_extract(ExtractConfig(manifest=str(out / "manifest.csv"), out_dir=str(tmp_path / "rec"),
                              patches_per_image=1, source_size=16, patch_size=16,
                              min_fraction=0.0, num_shards=1, split_fractions=(0.5, 0.5, 0.0)))
    report = pd.read_csv(tmp_path / "rec" / "extract_report.csv")
    assert len(report) == 4 and set(report["status"]) == {"ok"}


def test_real_allen_section(tmp_path):
    from conftest import shared_data_path

    src = shared_data_path("allen", "mouse_prox1_sagittal_ds2.jpg")
    table = tmp_path / "t.csv"
    table.write_text(f"path,gene_symbol,donor_id,plane_of_section\n{src},Prox1,mouse1,sagittal\n")
    m = ingest(IngestConfig(out=str(tmp_path / "d"), table=str(table), study="mouse")).manifest
    with Image.open(src) as im:
        assert (m.loc[0, "width"], m.loc[0, "height"]) == im.size
    assert m.loc[0, "plane_of_section"] == "sagittal" and m.loc[0, "study"] == "mouse"

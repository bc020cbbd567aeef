"""The manifest schema: validation, clear errors, atomic writes, merging for resume."""

import os

import pandas as pd
import pytest

from ish_tf.data import manifest


def _rows(n=3, **over):
    rows = []
    for i in range(n):
        row = dict(image_id=100 + i, experiment_id=10 + i // 2, study="synthetic",
                   gene_symbol=f"G{i % 2}", entrez_id=500 + i % 2, specimen_id=7,
                   donor_id=f"H0{i}-0001", donor_sex="M", donor_age=40.5, donor_race="",
                   smoker="no", diagnosis="control", tissue_ph=6.5, pmi=12.0, region="V1",
                   plane_of_section="coronal", width=64, height=48, path=f"images/{100 + i}.jpg")
        row.update(over)
        rows.append(row)
    return pd.DataFrame(rows)


def test_round_trip_keeps_types_and_order(tmp_path):
    path = str(tmp_path / "manifest.csv")
    df = _rows().iloc[::-1]
    written = manifest.write_manifest(df, path)
    back = manifest.read_manifest(path)
    assert list(back.columns[: len(manifest.COLUMN_NAMES)]) == list(manifest.COLUMN_NAMES)
    assert back["image_id"].tolist() == [100, 101, 102]  # sorted by image_id
    assert back["image_id"].dtype == "int64"
    assert str(back["entrez_id"].dtype) == "Int64"
    pd.testing.assert_frame_equal(back, written)


def test_missing_column_names_column_and_file(tmp_path):
    path = tmp_path / "m.csv"
    _rows().drop(columns=["gene_symbol"]).to_csv(path, index=False)
    with pytest.raises(manifest.ManifestError) as err:
        manifest.read_manifest(str(path))
    assert "gene_symbol" in str(err.value) and str(path) in str(err.value)


def test_bad_type_names_row_and_column(tmp_path):
    path = tmp_path / "m.csv"
    df = _rows()
    df["width"] = df["width"].astype(object)
    df.loc[1, "width"] = "wide"
    df.to_csv(path, index=False)
    with pytest.raises(manifest.ManifestError, match=r"'width'.*row 3.*'wide'"):
        manifest.read_manifest(str(path))


def test_empty_required_value_and_duplicates_rejected(tmp_path):
    with pytest.raises(manifest.ManifestError, match="donor_id.*row 2"):
        manifest.validate(_rows(donor_id=""), "x.csv")
    with pytest.raises(manifest.ManifestError, match="image_id 100 appears more than once"):
        manifest.validate(_rows(image_id=100), "x.csv")


def test_optional_columns_may_be_absent_and_extra_kept():
    df = _rows()[list(manifest.REQUIRED)].assign(stain_batch="b1")
    out = manifest.validate(df)
    assert out["tissue_ph"].isna().all()
    assert out.columns[-1] == "stain_batch"


def test_unreadable_file_is_reported(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"")
    with pytest.raises(manifest.ManifestError, match="cannot be read"):
        manifest.read_manifest(str(path))
    with pytest.raises(manifest.ManifestError, match="not found"):
        manifest.read_manifest(str(tmp_path / "absent.csv"))


def test_merge_new_rows_win_and_no_duplicates():
    old = manifest.validate(_rows(3))
    new = manifest.validate(_rows(2, width=99).assign(image_id=[102, 103]))
    merged = manifest.merge_manifests(old, new)
    assert merged["image_id"].tolist() == [100, 101, 102, 103]
    assert merged.set_index("image_id").loc[102, "width"] == 99


def test_paths_relative_to_manifest(tmp_path):
    mpath = str(tmp_path / "ds" / "manifest.csv")
    img = str(tmp_path / "ds" / "images" / "1.jpg")
    rel = manifest.relative_image_path(mpath, img)
    assert rel == os.path.join("images", "1.jpg")
    assert manifest.image_path(mpath, rel) == img
    outside = str(tmp_path / "elsewhere.jpg")
    assert manifest.relative_image_path(mpath, outside) == outside


def test_write_is_atomic_on_error(tmp_path):
    path = tmp_path / "manifest.csv"
    manifest.write_manifest(_rows(), str(path))
    before = path.read_bytes()
    with pytest.raises(manifest.ManifestError):
        manifest.write_manifest(_rows(image_id=5), str(path))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]


def test_summarize_counts():
    s = manifest.summarize(manifest.validate(_rows(4)))
    assert s["images"] == 4 and s["genes"] == 2 and s["donors"] == 4 and s["regions"] == ["V1"]


def test_fractional_image_id_is_an_error_not_truncated(tmp_path):
    """image_id 7777777.9 used to become 7777777 silently; it is an error naming the row."""
    import pandas as pd

    from ish_tf.data.manifest import ManifestError, read_manifest

    rows = [{"image_id": 1, "experiment_id": 1, "study": "s", "gene_symbol": "A",
             "donor_id": "d", "width": 10, "height": 10, "path": "a.jpg"},
            {"image_id": 7777777.9, "experiment_id": 2, "study": "s", "gene_symbol": "B",
             "donor_id": "d", "width": 10, "height": 10, "path": "b.jpg"}]
    path = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(ManifestError, match=r"image_id.*integers.*row 3.*7777777\.9"):
        read_manifest(str(path))
    rows[1]["image_id"] = 7777777.0  # integral values written as floats are fine
    pd.DataFrame(rows).to_csv(path, index=False)
    assert read_manifest(str(path))["image_id"].tolist() == [1, 7777777]

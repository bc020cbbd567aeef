"""Splits that hold (issue 21): genes assigned by their patches, empty splits refused."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ish_tf.data import patches as P
from ish_tf.data import shards, splits
from ish_tf.data.manifest import write_manifest


def test_balance_splits_fills_every_split_near_its_share():
    # Gene sizes as extraction found them: two genes without patches, one large gene.
    counts = {f"g{i}": n for i, n in enumerate([0, 0, 400, 50, 50, 40, 40, 30, 30, 20, 20, 10])}
    out = splits.balance_splits(counts, (0.8, 0.1, 0.1), seed=0)
    assert set(out) == set(counts)
    per = {s: sum(counts[g] for g in out if out[g] == s) for s in splits.SPLITS}
    total = sum(counts.values())
    assert all(per[s] > 0 for s in splits.SPLITS), per
    assert abs(per["train"] / total - 0.8) < 0.06 and abs(per["test"] / total - 0.1) < 0.06, per
    # The same seed gives the same assignment, whatever the input order.
    assert splits.balance_splits(dict(reversed(list(counts.items()))), (0.8, 0.1, 0.1), 0) == out
    # A zero share stays empty; fewer genes with patches than splits fill the larger first.
    two = splits.balance_splits({"a": 5, "b": 5, "c": 0}, (0.5, 0.5, 0.0), seed=1)
    assert sorted(two[g] for g in ("a", "b")) == ["train", "validation"] and two["c"] != "test"


def test_check_splits_names_the_empty_split():
    with pytest.raises(splits.SplitError, match=r"validation requested .*validation: 0 patches"):
        splits.check_splits({"train": 90, "test": 10}, (0.8, 0.1, 0.1), hint="; do X")
    lines = splits.check_splits({"train": 90, "test": 10}, (0.8, 0.1, 0.1), allow_empty=True)
    assert lines[-1].startswith("warning: split(s) validation")
    assert splits.check_splits({"train": 8, "validation": 2}, (0.8, 0.2, 0.0)) == [
        "train: 8 patches (80.0%, requested 80%)", "validation: 2 patches (20.0%, requested 20%)"]


@pytest.fixture(scope="module")
def blank_genes(tmp_path_factory):
    """6 genes x 2 donors of 200x224 sections; the genes that the planned split sends to
    validation get blank slides, so 'plan' leaves validation without patches."""
    from ish_tf.data.synthetic import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("splits")
    df = generate_dataset(SynthConfig(out_dir=str(out), n_genes=6, n_donors=2, donors_per_gene=2,
                                      n_groups=2, images_per_gene_donor=1, height=200,
                                      width=224, seed=5))
    planned = shards.split_genes(sorted(df["gene_symbol"].unique()), (0.5, 0.25, 0.25), 0)
    for row in df.itertuples():
        if planned[row.gene_symbol] == "validation":
            Image.fromarray(np.full((200, 224, 3), 247, np.uint8)).save(
                out / "images" / f"{row.image_id}.jpg")
    write_manifest(pd.read_csv(out / "manifest.csv"), str(out / "manifest.csv"))
    return out


def _cfg(data, out, **kw):
    return P.ExtractConfig(manifest=str(data / "manifest.csv"), out_dir=str(out),
                           patches_per_image=3, source_size=64, patch_size=16, max_tries=60,
                           num_shards=1, split_fractions=(0.5, 0.25, 0.25), **kw)


def test_plan_refuses_an_empty_split_and_balanced_fills_it(blank_genes, tmp_path, monkeypatch):
    with pytest.raises(P.ExtractError, match="validation.*hold no patches.*--split_assign=balanced"):
        P.run_extract(_cfg(blank_genes, tmp_path / "plan"))
    out = tmp_path / "balanced"
    summary = P.run_extract(_cfg(blank_genes, out, split_assign="balanced"))
    per = {s: v["patches"] for s, v in summary["splits"].items()}
    assert all(per.get(s, 0) > 0 for s in splits.SPLITS), per
    # Mask QC names the blank slides (no tissue among sections) and writes the sheet.
    blank = pd.read_csv(out / P.REPORT_NAME).query("status == 'no_tissue'")["image_id"]
    assert len(blank) == 4 and all(f"image {i} " in summary["mask_qc"][0] for i in blank)
    assert (out / "mask_qc.html").exists()
    assigned = pd.read_csv(out / splits.SPLITS_NAME)
    info = shards.load_dataset_info(str(out))
    assert {g.gene_symbol: g.split for g in info.genes} == dict(zip(assigned["item"],
                                                                    assigned["split"], strict=True))
    # The planned patches are the patches written, split by split.
    planned = assigned.groupby("split")["planned_patches"].sum().to_dict()
    assert planned == {s: n for s, n in per.items() if n}
    # Resume reuses OUT/splits.csv: no counting pass, same records.
    monkeypatch.setattr(splits, "count_patches", lambda *a, **k: pytest.fail("recounted"))
    again = P.run_extract(_cfg(blank_genes, out, split_assign="balanced"))
    assert again["shards_written"] == 0 and again["splits"] == summary["splits"]

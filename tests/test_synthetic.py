"""Tests of the synthetic ISH generator: determinism, files, and the properties it promises."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ish_tf.data import manifest
from ish_tf.data import synthetic as syn
from ish_tf.data import synthetic_specs as specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(out_dir: str, **kw) -> syn.SynthConfig:
    base = dict(out_dir=out_dir, n_genes=4, n_donors=3, donors_per_gene=2, images_per_gene_donor=2,
                height=64, width=64, n_groups=2, seed=3)
    base.update(kw)
    return syn.SynthConfig(**base)


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _od(rgb: np.ndarray, donor: specs.DonorSpec) -> np.ndarray:
    """Optical density per pixel and channel against the donor's slide colour, (H, W, 3)."""
    return -np.log(np.maximum(rgb.astype(np.float64), 0.5) / np.asarray(donor.background))


def _gene(pattern: str = "widespread", level: int = 3, **kw) -> specs.GeneSpec:
    spec = dict(symbol="SG999", entrez_id=900999, group=0, level=level, pattern=pattern,
                profile=(0.1, 0.9, 0.8, 0.9, 0.8, 0.9), wm_expression=0.02,
                class_weights=(1.0, 0.5, 0.0), fraction=0.7, intensity=specs.LEVEL_OD[level],
                intensity_cv=0.2, cell_size=1.0, elongation=1.5, punctate=0.2, neuropil=0.05)
    spec.update(kw)
    return specs.GeneSpec(**spec)


def _donor(**kw) -> specs.DonorSpec:
    return dataclasses.replace(specs.make_donors(2, np.random.default_rng(0))[0], **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny dataset written once, rendered in the main process."""
    out = str(tmp_path_factory.mktemp("synth") / "a")
    cfg = _tiny(out)
    return cfg, syn.generate_dataset(cfg)


# ------------------------------------------------------------------------ config, design
def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="donors_per_gene"):
        syn.SynthConfig(n_donors=3, donors_per_gene=4)
    with pytest.raises(ValueError, match="donors_per_gene"):
        syn.SynthConfig(donors_per_gene=1)
    with pytest.raises(ValueError, match="n_groups"):
        syn.SynthConfig(n_genes=3, n_groups=4)
    with pytest.raises(ValueError, match="jpeg_quality"):
        syn.SynthConfig(jpeg_quality=0)


def test_design_assays_each_gene_in_distinct_balanced_donors():
    cfg = syn.SynthConfig(n_genes=10, n_donors=5, donors_per_gene=3, images_per_gene_donor=2)
    genes, donors = syn.make_specs(cfg)
    plan = syn.design(cfg, genes, donors)
    assert len(plan) == 10 * 3 * 2
    assert plan["image_id"].is_unique
    per_gene = plan.groupby("gene")["donor"].nunique()
    assert (per_gene == 3).all()
    load = plan.drop_duplicates("experiment_id")["donor"].value_counts()
    assert load.max() - load.min() <= 1
    assert plan.groupby("experiment_id")[["gene", "donor"]].nunique().eq(1).all().all()
    # Images of an experiment alternate between the two regions.
    assert (plan.groupby("experiment_id")["region"].nunique() == 2).all()


def test_donors_have_metadata_and_half_are_schizophrenia():
    donors = specs.make_donors(6, np.random.default_rng(1))
    assert sum(d.diagnosis == "schizophrenia" for d in donors) == 3
    assert len({d.donor_id for d in donors}) == 6
    for d in donors:
        assert d.sex in ("M", "F") and d.smoker in ("yes", "no", "unknown")
        assert 6.0 <= d.tissue_ph <= 7.0 and d.pmi > 0 and d.age > 18
        assert min(d.background) > 200  # near-white slide
    # Donor effects vary between donors.
    assert len({round(d.stain_scale, 3) for d in donors}) == 6
    assert len({round(d.hue, 3) for d in donors}) == 6


def test_groups_share_expression_characteristics():
    genes = specs.make_genes(240, np.random.default_rng(5), n_groups=6)
    df = pd.DataFrame([dataclasses.asdict(g) for g in genes])
    # Most members of a group share its majority pattern, not all (not trivial).
    share = df.groupby("group")["pattern"].agg(lambda s: s.value_counts(normalize=True).iloc[0])
    assert share.mean() > 0.6 and share.min() < 1.0
    # Continuous characteristics vary less within groups than across all genes.
    for col in ("cell_size", "punctate", "elongation"):
        assert df.groupby("group")[col].std().mean() < 0.6 * df[col].std(), col
    # Levels follow the patterns: ND genes are "-" or "+", patterned genes mostly above.
    assert set(df.loc[df.pattern == "ND", "level"]) <= {0, 1}
    assert (df.loc[df.pattern != "ND", "level"] >= 1).all()


def test_same_pattern_and_level_genes_differ_in_profile():
    genes = specs.make_genes(120, np.random.default_rng(6), n_groups=6)
    by_key: dict[tuple, list] = {}
    for g in genes:
        by_key.setdefault((g.pattern, g.level), []).append(g)
    pairs = [(a, b) for v in by_key.values() if v[0].pattern != "ND" for a, b in zip(v, v[1:], strict=False)]
    assert len(pairs) >= 10
    for a, b in pairs:
        diff = np.abs(np.subtract(a.profile, b.profile)).max()
        assert diff > 0.01 or abs(a.fraction - b.fraction) > 0.01, (a.symbol, b.symbol)


def test_region_layering_v1_has_thick_layer_4():
    v1, mtg = syn.region_layers("V1"), syn.region_layers("MTG")
    assert v1[3] - v1[2] > 2 * (mtg[3] - mtg[2])
    assert np.all(np.diff(v1) > 0) and v1[-1] == 1.0


# ------------------------------------------------------------------------- dataset files
def test_manifest_validates_and_fills_the_schema(dataset):
    cfg, written = dataset
    df = manifest.read_manifest(os.path.join(cfg.out_dir, "manifest.csv"))
    assert len(df) == cfg.n_genes * cfg.donors_per_gene * cfg.images_per_gene_donor
    for col in manifest.COLUMN_NAMES:
        if col in ("um_per_pixel", "read_downsample"):
            # Synthetic sections have no physical scale and are read as stored: left empty.
            assert df[col].isna().all(), col
            continue
        assert df[col].notna().all(), col
    assert set(df["region"]) == set(cfg.regions)
    assert set(df["plane_of_section"]) == {"coronal"}
    assert set(df["study"]) == {"synthetic"}
    assert (df.groupby("gene_symbol")["donor_id"].nunique() == cfg.donors_per_gene).all()
    assert (df.groupby("experiment_id")[["gene_symbol", "donor_id"]].nunique() == 1).all().all()
    assert (df.groupby("donor_id")["specimen_id"].nunique() == 1).all()
    assert list(df["image_id"]) == sorted(df["image_id"])
    pd.testing.assert_frame_equal(df, written)
    for row in df.itertuples():
        path = manifest.image_path(os.path.join(cfg.out_dir, "manifest.csv"), row.path)
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.size == (row.width, row.height) and im.mode == "RGB"
        with Image.open(os.path.join(cfg.out_dir, "masks", f"{row.image_id}.png")) as m:
            values = set(np.unique(np.asarray(m)))
        assert values <= {0, 255} and len(values) == 2


def test_annotations_gaf_and_obo_agree(dataset):
    cfg, _ = dataset
    ann = pd.read_csv(os.path.join(cfg.out_dir, "annotations.csv"), keep_default_na=False)
    assert list(ann.columns[:4]) == ["gene_symbol", "entrez_id", "level", "pattern"]
    assert {"group", "layer_marker", "cell_type", "marker"} <= set(ann.columns)
    assert set(ann["level"]) <= set(specs.LEVEL_LABELS)
    assert set(ann["pattern"]) <= set(specs.PATTERNS)
    assert len(ann) == cfg.n_genes and ann["gene_symbol"].is_unique
    laminar = ann[ann.pattern == "laminar"]
    assert laminar["layer_marker"].str.match(r"layer \d").all()
    assert (ann.loc[ann.pattern != "laminar", "layer_marker"] == "").all()

    with open(os.path.join(cfg.out_dir, "go.gaf"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert lines[0] == "!gaf-version: 2.2"
    rows = [line.split("\t") for line in lines if not line.startswith("!")]
    assert all(len(r) == 17 for r in rows)
    assert {r[0] for r in rows} == {"synthetic"} and {r[8] for r in rows} == {"P"}
    assert all(re.fullmatch(r"GO:99\d{5}", r[4]) for r in rows)
    assert all(re.fullmatch(r"\d{8}", r[13]) for r in rows)
    gaf_groups = {r[2]: r[4] for r in rows}
    assert gaf_groups == dict(zip(ann["gene_symbol"], ann["group"], strict=True))
    assert len(set(gaf_groups.values())) == cfg.n_groups

    with open(os.path.join(cfg.out_dir, "go.obo"), encoding="utf-8") as f:
        stanzas = f.read().split("[Term]")[1:]
    parents = {}
    for stanza in stanzas:
        term = re.search(r"^id: (\S+)", stanza, re.M).group(1)
        is_a = re.findall(r"^is_a: (\S+)", stanza, re.M)
        parents[term] = is_a
    for term in set(gaf_groups.values()):  # every group term reaches the single root
        seen = term
        for _ in range(5):
            if not parents[seen]:
                break
            seen = parents[seen][0]
            assert seen in parents
        assert seen == "GO:9900000"


def test_generation_is_byte_identical_serial_or_parallel_and_resumes(tmp_path, dataset):
    cfg, _ = dataset
    reference = _files(cfg.out_dir)
    # Same seed in parallel workers: same bytes.
    other = _tiny(str(tmp_path / "b"), workers=2)
    syn.generate_dataset(other)
    assert _files(other.out_dir) == reference
    # Resume: a missing image and a truncated one are rendered again, identically.
    images = sorted(os.listdir(os.path.join(other.out_dir, "images")))
    os.remove(os.path.join(other.out_dir, "images", images[0]))
    with open(os.path.join(other.out_dir, "images", images[1]), "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(other.out_dir, "manifest.csv"))
    syn.generate_dataset(dataclasses.replace(other, workers=0))
    assert _files(other.out_dir) == reference
    # A different seed changes the images; reusing the directory with it is refused.
    with pytest.raises(ValueError, match="different config"):
        syn.generate_dataset(dataclasses.replace(other, seed=4))
    changed = _tiny(str(tmp_path / "c"), seed=4)
    syn.generate_dataset(changed)
    assert _files(changed.out_dir)[f"images/{images[0]}"] != reference[f"images/{images[0]}"]


# ------------------------------------------------------------------ rendered properties
def test_render_is_pure_and_deterministic():
    gene, donor = _gene(), _donor()
    a = syn.render_section(gene, donor, np.random.default_rng(11), 80, 96, "V1")
    b = syn.render_section(gene, donor, np.random.default_rng(11), 80, 96, "V1")
    assert a[0].shape == (80, 96, 3) and a[0].dtype == np.uint8
    assert a[1].shape == (80, 96) and a[1].dtype == bool
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    c = syn.render_section(gene, donor, np.random.default_rng(12), 80, 96, "V1")
    assert not np.array_equal(a[0], c[0])


def test_true_mask_matches_drawn_tissue():
    donor = _donor(noise_sd=2.0, blur_sigma=0.8)
    fractions, ious = [], []
    for seed in range(8):
        r = syn.render_section_full(_gene(level=2), donor, np.random.default_rng(seed), 96, 96, "MTG")
        fractions.append(r.mask.mean())
        if r.mask.all() or not r.mask.any():
            continue
        od = _od(r.rgb, donor)[..., 1]
        # Tissue absorbs: a threshold between slide and tissue levels recovers the mask.
        level = 0.5 * (np.median(od[r.mask]) + np.median(od[~r.mask]))
        drawn = od > level
        ious.append((drawn & r.mask).sum() / (drawn | r.mask).sum())
        # The slide is near the donor's slide colour.
        assert np.abs(np.median(r.rgb[~r.mask], axis=0) - np.asarray(donor.background)).max() < 4
    assert min(ious) > 0.9
    # Tissue covers a good part of most images, but not all of them.
    assert 0.55 < np.mean(fractions) < 0.95
    assert min(fractions) < 1.0


def test_darkness_increases_with_level():
    donor = _donor(noise_sd=0.0)
    # One gene at every level on the same section: strictly darker.
    darkness = []
    for level in range(6):
        r = syn.render_section_full(_gene(level=level), donor, np.random.default_rng(2), 96, 96, "V1")
        darkness.append(_od(r.rgb, donor)[r.mask].mean())
    assert np.all(np.diff(darkness) > 0), darkness
    # Across generated genes of all patterns: monotone on average.
    genes = specs.make_genes(48, np.random.default_rng(9), n_groups=6)
    rows = []
    for i, g in enumerate(genes):
        r = syn.render_section_full(g, donor, np.random.default_rng(100 + i % 4), 64, 64, "MTG")
        rows.append((g.level, _od(r.rgb, donor)[r.mask].mean()))
    df = pd.DataFrame(rows, columns=["level", "dark"])
    assert df["level"].corr(df["dark"], method="spearman") > 0.4
    means = df.groupby("level")["dark"].mean()
    assert means.loc[[0, 1]].max() < means.loc[[4, 5]].min()


def test_laminar_gene_follows_its_layer_profile():
    profile = (0.02, 0.05, 0.25, 0.95, 0.25, 0.03)  # a layer 4 marker
    gene = _gene("laminar", level=4, profile=profile, class_weights=(1.0, 0.1, 0.0), fraction=0.9,
                 layer_marker="layer 4", neuropil=0.0, punctate=0.0)
    donor = _donor()
    per_layer = np.zeros(6)
    expressing = np.zeros(6)
    for seed in range(3):
        r = syn.render_section_full(gene, donor, np.random.default_rng(seed), 192, 192, "V1")
        od = _od(r.rgb, donor).mean(axis=2)
        for k in range(6):
            per_layer[k] += od[r.layers == k].mean() / 3
            in_k = r.cell_layers == k
            expressing[k] += r.cell_expressing[in_k].mean() / 3 if in_k.any() else 0.0
    assert per_layer[3] > per_layer[[0, 1, 5]].max() + 0.1, per_layer
    assert per_layer[3] > max(per_layer[2], per_layer[4])
    # The cells that express follow the profile (layer 1 has few cells, leave it out).
    assert np.corrcoef(expressing[1:], np.asarray(profile)[1:])[0, 1] > 0.9


def test_sparse_expresses_in_fewer_cells_than_widespread():
    donor = _donor()
    genes = specs.make_genes(60, np.random.default_rng(4), n_groups=6)
    frac = {"sparse": [], "widespread": []}
    area = {"sparse": [], "widespread": []}
    for g in genes:
        if g.pattern in frac:
            r = syn.render_section_full(g, donor, np.random.default_rng(1), 96, 96, "MTG")
            frac[g.pattern].append(r.n_expressing / r.n_cells)
            od = _od(r.rgb, donor).mean(axis=2)
            area[g.pattern].append((od[r.mask] > 0.35).mean())  # stained area from the image
    assert frac["sparse"] and frac["widespread"]
    assert max(frac["sparse"]) < min(frac["widespread"])
    assert np.mean(area["sparse"]) < 0.5 * np.mean(area["widespread"])


def test_nd_gene_is_close_to_unstained_tissue():
    donor = _donor()
    nd = _gene("ND", level=0, fraction=0.0, intensity=0.0, neuropil=0.0)
    blank = syn.render_section_full(nd, donor, np.random.default_rng(8), 96, 96, "V1")
    assert blank.n_expressing == 0 and float(blank.stain_od.max()) == 0.0
    unstained = _od(blank.rgb, donor)[blank.mask].mean()
    assert unstained < 0.2  # pale tissue
    for level in (2, 3):
        r = syn.render_section_full(_gene(level=level), donor, np.random.default_rng(8), 96, 96, "V1")
        assert _od(r.rgb, donor)[r.mask].mean() - unstained > 0.05
    faint = syn.render_section_full(_gene("ND", level=1, fraction=0.3), donor,
                                    np.random.default_rng(8), 96, 96, "V1")
    strong = syn.render_section_full(_gene(level=4), donor, np.random.default_rng(8), 96, 96, "V1")
    excess = lambda r: _od(r.rgb, donor)[r.mask].mean() - unstained  # noqa: E731
    assert excess(faint) < 0.25 * excess(strong)


def test_donor_effects_change_hue_and_intensity_by_their_parameters():
    gene = _gene(level=3, punctate=0.0)
    base = dict(blur_sigma=0.5, noise_sd=0.0, background=(240.0, 238.0, 236.0), tissue_od=0.1)
    blue = _donor(hue=0.0, stain_scale=0.8, **base)
    purple = _donor(hue=1.0, stain_scale=1.25, **base)
    nd = _gene("ND", level=0, fraction=0.0, intensity=0.0, neuropil=0.0)
    stats = {}
    for name, donor in (("blue", blue), ("purple", purple)):
        r = syn.render_section_full(gene, donor, np.random.default_rng(5), 128, 128, "V1")
        r0 = syn.render_section_full(nd, donor, np.random.default_rng(5), 128, 128, "V1")
        ink = _od(r.rgb, donor) - _od(r0.rgb, donor)  # the stain's own optical density
        stained = r.stain_od > 0.3
        stats[name] = (ink[stained].mean(axis=0), r.stain_od)
    # The tissue and cells are the same; only the donor's effects differ.
    np.testing.assert_array_equal(stats["blue"][1], stats["purple"][1])
    for name, donor in (("blue", blue), ("purple", purple)):
        vec = donor.stain_vector()
        measured = stats[name][0]
        assert abs(measured[0] / measured[1] - vec[0] / vec[1]) < 0.1 * vec[0] / vec[1], name
    # Purple precipitate lets more red through than blue precipitate does.
    red_over_green = {k: v[0][0] / v[0][1] for k, v in stats.items()}
    assert red_over_green["purple"] < red_over_green["blue"] - 0.3, red_over_green
    ratio = stats["purple"][0].sum() / stats["blue"][0].sum()
    expected = (1.25 * purple.stain_vector().sum()) / (0.8 * blue.stain_vector().sum())
    assert abs(ratio / expected - 1.0) < 0.1, (ratio, expected)
    # Blur: a blurrier scan has less pixel-to-pixel contrast.
    sharp = syn.render_section(gene, dataclasses.replace(blue, blur_sigma=0.0),
                               np.random.default_rng(5), 96, 96, "V1")[0].astype(float)
    soft = syn.render_section(gene, dataclasses.replace(blue, blur_sigma=1.2),
                              np.random.default_rng(5), 96, 96, "V1")[0].astype(float)
    assert np.abs(np.diff(soft, axis=1)).mean() < 0.8 * np.abs(np.diff(sharp, axis=1)).mean()


# ------------------------------------------------------------------------------- CLI
def test_cli_writes_dataset_and_rejects_missing_out(tmp_path):
    out = tmp_path / "cli"
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "ish_tf.cli.synth", f"--flagfile={ROOT}/configs/synth_quickstart.cfg",
           f"--out={out}", "--n_genes=3", "--n_donors=2", "--donors_per_gene=2",
           "--images_per_gene_donor=1", "--n_groups=2", "--synth_height=64", "--synth_width=64"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "synth: dataset of 6 images of 3 genes in 2 donors" in done.stdout
    assert str(out) in done.stdout
    df = manifest.read_manifest(str(out / "manifest.csv"))
    assert len(df) == 6 and set(df["width"]) == {64}
    assert "--n_genes=3" in (out / "synth_flags.cfg").read_text()
    bad = subprocess.run([sys.executable, "-m", "ish_tf.cli.synth", "--n_genes=3"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert bad.returncode != 0 and "--out is required" in bad.stderr
    shutil.rmtree(out)

"""`bin/synth`: write a synthetic ISH dataset (images, true masks, manifest, annotations, GO).

Example:
  bin/synth --out=data/synth --n_genes=24 --n_donors=4 --seed=0
  bin/synth --flagfile=configs/synth_quickstart.cfg
  bin/synth --modality=expression --out=data/synth_cells --n_genes=500 --synth_cells=600
  bin/synth --modality=fluorescence --out=data/plates --synth_plates=2 --seed=0

--modality=expression writes synthetic expression profiles instead
(`ish_tf.data.synthetic_expression`): OUT/counts.csv (samples x genes counts), OUT/obs.csv
(sample_id, cell_type, batch); ingest them with
`bin/ingest --expression=OUT/counts.csv --obs=OUT/obs.csv --label_column=cell_type`.

--modality=fluorescence writes 6-channel fluorescence plates in the RxRx1 challenge
layout (`ish_tf.data.synthetic_plates`): OUT/{train,test}/EXPERIMENT/PlateP/*.png,
OUT/train.csv, test.csv, train_controls.csv, test_controls.csv and OUT/truth.csv; ingest
them with `bin/ingest --layout=rxrx1 --images=OUT --out=DIR`.

Writes OUT/images/{image_id}.jpg, OUT/masks/{image_id}.png, OUT/manifest.csv,
OUT/annotations.csv, OUT/go.gaf, OUT/go.obo, OUT/specs.json and OUT/synth_flags.cfg
(the resolved flags). Rerunning the same command resumes: images already on disk are
kept, and the same seed gives the same bytes.
"""

from __future__ import annotations

import os
import sys
import time

from ish_tf import config
from ish_tf.cli import define_common, definer, run, usage_errors

NAME = "synth"
USES_TENSORFLOW = False


def define_synth(fv) -> None:
    """Flags of `bin/synth` (synthetic ISH sections -> images/, masks/, manifest.csv, ...)."""
    d = definer(fv, NAME)
    d.string("out", "", "Output directory of the dataset.")
    d.enum("modality", "ish", ["ish", "expression", "fluorescence"], "ish: sections (images, "
           "masks, manifest); expression: count profiles of cell types (counts.csv, "
           "obs.csv); fluorescence: 6-channel plates in the RxRx1 challenge layout.")
    d.integer("synth_cells", 600, "--modality=expression: profiles (of --n_genes genes, "
              "500 when not given).", lower_bound=1)
    d.integer("synth_cell_types", 6, "--modality=expression: cell types; "
              "--modality=fluorescence: cell types of RxRx1 (1..4, 4 when not given).",
              lower_bound=1)
    d.integer("synth_batches", 2, "--modality=expression: batches (with batch effects).",
              lower_bound=1)
    define_synth_plates(d)
    d.integer("n_genes", 24, "Number of synthetic genes.", lower_bound=1)
    d.integer("n_donors", 4, "Number of synthetic donors (half get a schizophrenia "
              "diagnosis).", lower_bound=2)
    d.integer("donors_per_gene", 3, "Donors each gene is assayed in (>= 2, so "
              "re-identification in another donor is possible).", lower_bound=2)
    d.integer("images_per_gene_donor", 2, "Section images per (gene, donor) experiment.",
              lower_bound=1)
    d.integer("n_groups", 6, "Number of GO-like gene groups (go.gaf, go.obo).", lower_bound=1)
    d.integer("synth_height", 256, "Height of the synthetic images, pixels.", lower_bound=32)
    d.integer("synth_width", 256, "Width of the synthetic images, pixels.", lower_bound=32)
    d.list("synth_regions", ["V1", "MTG"], "Brain regions; the images of an experiment "
           "alternate between them (V1 gets a thick layer 4).")
    d.string("synth_study", "synthetic", "Value of the manifest's study column.")
    d.integer("synth_jpeg_quality", 90, "JPEG quality of the images (1..100).", lower_bound=1,
              upper_bound=100)
    d.integer("synth_workers", 0, "Worker processes rendering images; 0 = render in the main "
              "process.", lower_bound=0)


def define_synth_plates(d) -> None:
    """--modality=fluorescence flags (`ish_tf.data.synthetic_plates.PlateSynthConfig`)."""
    d.integer("synth_experiments", 2, "--modality=fluorescence: labelled experiments "
              "(dataset train) per cell type.", lower_bound=1)
    d.integer("synth_test_experiments", 1, "--modality=fluorescence: unlabelled experiments "
              "(dataset test; labels only in truth.csv) per cell type.", lower_bound=0)
    d.integer("synth_plates", 2, "--modality=fluorescence: plates per experiment.",
              lower_bound=1)
    d.integer("synth_class_groups", 2, "--modality=fluorescence: groups of siRNA classes; "
              "each plate holds one group.", lower_bound=1)
    d.integer("synth_classes_per_group", 12, "--modality=fluorescence: siRNA classes per "
              "group (wells per plate = this + controls).", lower_bound=1)
    d.integer("synth_positive_controls", 2, "--modality=fluorescence: positive-control "
              "classes on every plate (plus one negative control).", lower_bound=0)
    d.integer("synth_sites", 2, "--modality=fluorescence: sites imaged per well.",
              lower_bound=1)
    d.integer("synth_site_size", 64, "--modality=fluorescence: side of a site image, pixels "
              "(RxRx1: 512).", lower_bound=16)
    d.float("synth_effect", 1.0, "--modality=fluorescence: strength of the siRNA effects.",
            lower_bound=0.0)
    d.float("synth_noise", 1.0, "--modality=fluorescence: strength of the technical noise "
            "(experiment/plate gains and offsets, gradients, blur, edge wells).",
            lower_bound=0.0)


def plates_config(fv):
    """`ish_tf.data.synthetic_plates.PlateSynthConfig` from the flags (and --seed,
    --small_run: at most 2 cell types, 1 plate, 6 classes per group, 48 px).

    Raises:
      ValueError: an invalid setting (naming the field).
    """
    from ish_tf.data.synthetic_plates import PlateSynthConfig

    cell_types = fv.synth_cell_types if fv["synth_cell_types"].present else 4
    plates, per_group, size = fv.synth_plates, fv.synth_classes_per_group, fv.synth_site_size
    if fv.small_run:
        cell_types, plates = min(cell_types, 2), 1
        per_group, size = min(per_group, 6), min(size, 48)
    return PlateSynthConfig(
        cell_types=cell_types, experiments=fv.synth_experiments,
        test_experiments=fv.synth_test_experiments, plates=plates,
        class_groups=fv.synth_class_groups, classes_per_group=per_group,
        positive_controls=fv.synth_positive_controls, sites=fv.synth_sites, site_size=size,
        effect=fv.synth_effect, noise=fv.synth_noise, seed=fv.seed).validate()


def main_fluorescence(fv) -> int:
    """`bin/synth --modality=fluorescence`: plates in the RxRx1 challenge layout; 0 ok."""
    from ish_tf.data.synthetic_plates import generate_plates

    with usage_errors():
        if not fv.out:
            raise ValueError("--out is required: the directory to write the plates to")
        cfg = plates_config(fv)
    start = time.monotonic()
    try:
        result = generate_plates(fv.out, cfg, progress=False)
    except OSError as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 1
    config.write_flagfile(os.path.join(fv.out, "synth_flags.cfg"), fv)
    n_test = sum(d == "test" for d in result.experiments.values())
    print(f"synth: {len(result.experiments)} experiments ({n_test} unlabelled) of "
          f"{cfg.cell_types} cell type(s) x {cfg.plates} plate(s) x {cfg.wells_per_plate} wells "
          f"x {cfg.sites} site(s), {cfg.site_size} px, {result.n_classes} classes "
          f"({cfg.class_groups} group(s) of {cfg.classes_per_group} + "
          f"{cfg.positive_controls + 1} controls), seed {cfg.seed}: {result.n_images} images "
          f"in {time.monotonic() - start:.1f}s")
    out = os.path.abspath(fv.out)
    print(f"  layout: {out}/{{train,test}}/EXPERIMENT/PlateP/WELL_sS_wC.png + train.csv, "
          "test.csv, *_controls.csv")
    print(f"  truth:  {os.path.join(out, 'truth.csv')} (every well's siRNA, test wells too)")
    print(f"  next:   bin/ingest --layout=rxrx1 --images={fv.out} --out=DIR")
    return 0


def synth_config(fv):
    """`ish_tf.data.synthetic.SynthConfig` from the synth flags (and --seed, --small_run).

    --small_run shrinks the set to at most 8 genes, one image per (gene, donor) and
    128 x 128 pixels.

    Raises:
      ValueError: --out is empty, or the values do not make a valid SynthConfig (the
        message names the field).
    """
    from ish_tf.data.synthetic import SynthConfig

    if not fv.out:
        raise ValueError("--out is required: the directory to write the synthetic dataset to")
    n_genes, per_pair = fv.n_genes, fv.images_per_gene_donor
    height, width = fv.synth_height, fv.synth_width
    if fv.small_run:
        n_genes, per_pair = min(n_genes, 8), 1
        height, width = min(height, 128), min(width, 128)
    return SynthConfig(
        out_dir=fv.out, n_genes=n_genes, n_donors=fv.n_donors,
        donors_per_gene=fv.donors_per_gene, images_per_gene_donor=per_pair,
        height=height, width=width, regions=tuple(config.parse_list(fv.synth_regions)),
        seed=fv.seed, jpeg_quality=fv.synth_jpeg_quality, study=fv.synth_study,
        n_groups=min(fv.n_groups, n_genes), workers=fv.synth_workers)


def define_flags(fv) -> None:
    define_common(fv)
    define_synth(fv)


def main_expression(fv) -> int:
    """`bin/synth --modality=expression`: counts.csv + obs.csv; 0 ok."""
    from ish_tf.data.synthetic_expression import ExpressionSynthConfig, write_synthetic_profiles

    with usage_errors():
        if not fv.out:
            raise ValueError("--out is required: the directory to write the profiles to")
        # --n_genes' default (24) sizes the ISH set; profiles default to 500 genes.
        cells, genes = fv.synth_cells, (fv.n_genes if fv['n_genes'].present else 500)
        if fv.small_run:
            cells, genes = min(cells, 200), min(genes, 100)
        cfg = ExpressionSynthConfig(n_cells=cells, n_genes=genes, n_types=fv.synth_cell_types,
                                    n_batches=fv.synth_batches,
                                    genes_per_program=max(1, min(30, genes // 4)),
                                    seed=fv.seed).validate()
    paths = write_synthetic_profiles(fv.out, cfg)
    config.write_flagfile(os.path.join(fv.out, "synth_flags.cfg"), fv)
    print(f"synth: {cfg.n_cells} expression profiles x {cfg.n_genes} genes of {cfg.n_types} "
          f"cell types in {cfg.n_batches} batches, seed {cfg.seed}")
    print(f"  counts: {os.path.abspath(paths['counts'])}")
    print(f"  obs:    {os.path.abspath(paths['obs'])}")
    print(f"  gene programs (GMT): {os.path.abspath(paths['programs'])}")
    print(f"  next:   bin/ingest --expression={paths['counts']} --obs={paths['obs']} "
          "--label_column=cell_type --group_column=batch --out=DIR")
    return 0


def main(fv, argv: list[str]) -> int:
    """Writes the synthetic dataset; returns the exit status (0 ok, 1 write error)."""
    from absl import logging

    from ish_tf.data import manifest, synthetic

    if fv.modality == "expression":
        return main_expression(fv)
    if fv.modality == "fluorescence":
        return main_fluorescence(fv)
    with usage_errors():
        cfg = synth_config(fv)
    logging.info("synth: %d genes x %d donors (%d per gene) x %d images, %dx%d px, seed %d -> %s",
                 cfg.n_genes, cfg.n_donors, cfg.donors_per_gene, cfg.images_per_gene_donor,
                 cfg.height, cfg.width, cfg.seed, cfg.out_dir)
    start = time.monotonic()
    try:
        df = synthetic.generate_dataset(cfg)
    except (ValueError, OSError) as e:
        print(f"synth: error: {e}", file=sys.stderr)
        return 1
    # Written only after success, so a refused rerun cannot overwrite the record of a dataset.
    config.write_flagfile(os.path.join(cfg.out_dir, "synth_flags.cfg"), fv)
    summary = manifest.summarize(df)
    out = os.path.abspath(cfg.out_dir)
    # Counts describe the dataset on disk (a resumed run keeps finished images).
    print(f"synth: dataset of {summary['images']} images of {summary['genes']} genes in "
          f"{summary['donors']} donors ({summary['experiments']} experiments, regions "
          f"{', '.join(summary['regions'])}) ready in {time.monotonic() - start:.1f}s")
    print(f"  manifest:    {os.path.join(out, manifest.MANIFEST_NAME)}")
    print(f"  images:      {os.path.join(out, 'images')}/  masks: {os.path.join(out, 'masks')}/")
    print(f"  annotations: {os.path.join(out, 'annotations.csv')}")
    print(f"  GO groups:   {os.path.join(out, 'go.gaf')}, {os.path.join(out, 'go.obo')}")
    skipped = os.path.join(out, "skipped.csv")
    if os.path.exists(skipped):
        print(f"  skipped:     {skipped} (images that could not be written; rerun to retry)")
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main, tensorflow=USES_TENSORFLOW)

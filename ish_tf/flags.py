"""Every absl flag of ish_tf, defined once, and their conversion into config objects.

Only this module and `ish_tf/cli/*` touch `absl.flags.FLAGS`. Each `bin/` command
calls the `define_*` functions for the stages it uses, then the matching
`*_config(FLAGS)` converter, and hands the resulting dataclass to library code.
Library modules never read FLAGS.

Every command accepts `--flagfile=configs/NAME.cfg` (absl built-in). A run directory
keeps its resolved flags as a flagfile (`write_flagfile`), so any run can be replayed.

Sections are grouped by stage; each stage's converter imports its config class
lazily so `bin/fetch` does not pay for importing TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os

from absl import flags

from ish_tf.io_utils import atomic_write_text

FLAGS = flags.FLAGS

_defined: set[str] = set()


def _once(group: str) -> bool:
    """True the first time a group is defined (groups may be requested by several commands)."""
    if group in _defined:
        return False
    _defined.add(group)
    return True


# --------------------------------------------------------------------------- common
def define_common() -> None:
    if not _once("common"):
        return
    flags.DEFINE_integer("seed", 0, "Seed for every random choice of the stage.")
    flags.DEFINE_bool("small_run", False,
                      "Shrink batch sizes, buffers and step counts for a local smoke run.")


def write_flagfile(path: str, module_names: list[str] | None = None) -> None:
    """Writes the current values of ish_tf's flags to `path` as a replayable flagfile.

    Args:
      path: destination; written atomically.
      module_names: modules whose flags to include (default: this module, i.e. all
        ish_tf flags). Flags from absl itself (logging, flagfile) are left out.
    """
    modules = module_names or [__name__]
    lines = [f"# Resolved flags, replay with: --flagfile={os.path.basename(path)}"]
    for module in modules:
        for flag in FLAGS.get_flags_for_module(module):
            lines.append(flag.serialize())
    atomic_write_text(path, "\n".join(line for line in lines if line) + "\n")


def parse_list(value: str | list[str] | None) -> list[str]:
    """Comma-separated flag text (or an absl list) to a clean list of strings."""
    if value is None:
        return []
    items = value if isinstance(value, list) else value.split(",")
    return [s.strip() for s in items if s and s.strip()]


def _define_once(define, name: str, default, help_text: str, **kwargs) -> None:
    """Defines a flag unless another stage's section already did (e.g. --out, --workers).

    Several commands share generic names; a process that imports two CLIs (the test
    suite) must not define them twice. The first definition's default wins there;
    each `bin/` command only defines its own sections, so its defaults are its own.
    """
    if name not in FLAGS:
        define(name, default, help_text, **kwargs)


def _define_mask_background() -> None:
    """--mask_background, shared by bin/extract, bin/spatial and bin/predict."""
    if "mask_background" not in FLAGS:
        flags.DEFINE_enum("mask_background", "bright", ["bright", "dark"], "Slide background "
                          "for the classical segmenter: bright (brightfield ISH on a white "
                          "slide) or dark (fluorescence sections on black).")


# --------------------------------------------------------------------------- fetch
def define_fetch() -> None:
    """Flags of `bin/fetch` (Allen Brain Atlas section images -> images/, manifest.csv)."""
    if not _once("fetch"):
        return
    flags.DEFINE_enum("study", "cortex", ["cortex", "schizophrenia", "mouse"],
                      "Allen ISH product: cortex (Human Cortex Study, product 9), "
                      "schizophrenia (Human Schizophrenia Study, 11), mouse (adult Mouse, 1).")
    flags.DEFINE_string("api_url", "http://api.brain-map.org", "Allen API host (scheme://host[:port]).")
    # --out, --genes and --workers mean the same for every data stage: shared, defined once.
    _define_once(flags.DEFINE_string, "out", "", "Output directory: images/, manifest.csv, failures.csv.")
    _define_once(flags.DEFINE_string, "genes", "", "Comma-separated gene acronyms to fetch, or @FILE "
                 "with one per line; empty fetches every gene of the study.")
    flags.DEFINE_integer("max_images", 0, "Keep only the first N images (experiment id, image id "
                         "order); 0 = all.", lower_bound=0)
    flags.DEFINE_integer("sections_per_experiment", 0, "Keep only the N section images of each "
                         "experiment nearest the middle of its series (by section_number); "
                         "0 = all (an adult mouse series has ~20).", lower_bound=0)
    flags.DEFINE_integer("downsample", 2, "image_download downsample: each side halved N times.",
                         lower_bound=0)
    _define_once(flags.DEFINE_integer, "workers", 4, "Concurrent image downloads (fetch) or "
                 "worker processes (extract).", lower_bound=1)
    flags.DEFINE_string("plane", "", "plane_of_section to keep (coronal, sagittal); empty = the "
                        "study's default (mouse: sagittal, human: all); 'any' = all.")
    flags.DEFINE_integer("page_size", 50, "Rows per RMA query page (1..2000).", lower_bound=1)
    flags.DEFINE_integer("retries", 5, "Retries of a request after timeouts, 5xx, 429, cut-off "
                         "or undecodable bodies.", lower_bound=0)
    flags.DEFINE_float("backoff_base", 1.0, "First retry delay in seconds; doubles each retry.",
                       lower_bound=0.0)
    flags.DEFINE_float("max_retry_after", 60.0, "Cap on a server's Retry-After, seconds.",
                       lower_bound=0.0)
    flags.DEFINE_float("timeout", 60.0, "Connect/read timeout of one HTTP request, seconds.")


def fetch_config(FLAGS) -> FetchConfig:  # noqa: F821, N803 - imported lazily below
    """Converts the fetch flags into an `ish_tf.data.allen.FetchConfig`.

    Raises:
      ValueError: --genes names a file that cannot be read.
    """
    from ish_tf.data.allen import FetchConfig, read_gene_list

    return FetchConfig(
        study=FLAGS.study, out=FLAGS.out, api_url=FLAGS.api_url,
        genes=read_gene_list(FLAGS.genes), max_images=FLAGS.max_images,
        sections_per_experiment=FLAGS.sections_per_experiment,
        downsample=FLAGS.downsample, workers=FLAGS.workers, plane=FLAGS.plane,
        page_size=FLAGS.page_size, retries=FLAGS.retries, backoff_base=FLAGS.backoff_base,
        max_retry_after=FLAGS.max_retry_after, timeout=FLAGS.timeout)


# --------------------------------------------------------------------------- ingest
def define_ingest() -> None:
    """Flags of `bin/ingest` (your own section images -> manifest.csv)."""
    if not _once("ingest"):
        return
    _define_once(flags.DEFINE_string, "out", "", "Output directory: manifest.csv, skipped.csv.")
    flags.DEFINE_string("images", "", "Folder of your section images: searched with "
                        "--name_pattern, and the base of --table's relative paths.")
    flags.DEFINE_string("table", "", "CSV of the images: path and gene_symbol columns, plus any "
                        "manifest column (donor_id, entrez_id, region, diagnosis, ...) and your own.")
    flags.DEFINE_string("name_pattern", "", "Read the columns from the file names instead, e.g. "
                        "'{gene_symbol}/{donor_id}_*.jpg' (* within a folder, ** across folders).")
    flags.DEFINE_string("study_label", "user", "The manifest's study column where the table has none.")
    flags.DEFINE_string("default_donor", "unknown", "donor_id where neither the table nor the "
                        "pattern gives one.")
    _define_once(flags.DEFINE_integer, "workers", 4, "Threads reading image headers.", lower_bound=1)


def ingest_config(FLAGS) -> IngestConfig:  # noqa: F821, N803 - imported lazily below
    """Converts the ingest flags into an `ish_tf.data.ingest.IngestConfig` (not yet validated)."""
    from ish_tf.data.ingest import IngestConfig

    return IngestConfig(out=FLAGS.out, images=FLAGS.images, table=FLAGS.table,
                        name_pattern=FLAGS.name_pattern, study=FLAGS.study_label,
                        default_donor=FLAGS.default_donor, workers=FLAGS.workers)


# --------------------------------------------------------------------------- synth
def define_synth() -> None:
    """Flags of `bin/synth` (synthetic ISH sections -> images/, masks/, manifest.csv, ...)."""
    if not _once("synth"):
        return
    # --out means the same for every dataset-writing stage (fetch defines it too): share it.
    if "out" not in FLAGS:
        flags.DEFINE_string("out", "", "Output directory of the dataset.")
    flags.DEFINE_integer("n_genes", 24, "Number of synthetic genes.", lower_bound=1)
    flags.DEFINE_integer("n_donors", 4, "Number of synthetic donors (half get a schizophrenia "
                         "diagnosis).", lower_bound=2)
    flags.DEFINE_integer("donors_per_gene", 3, "Donors each gene is assayed in (>= 2, so "
                         "re-identification in another donor is possible).", lower_bound=2)
    flags.DEFINE_integer("images_per_gene_donor", 2, "Section images per (gene, donor) experiment.",
                         lower_bound=1)
    flags.DEFINE_integer("n_groups", 6, "Number of GO-like gene groups (go.gaf, go.obo).",
                         lower_bound=1)
    flags.DEFINE_integer("synth_height", 256, "Height of the synthetic images, pixels.",
                         lower_bound=32)
    flags.DEFINE_integer("synth_width", 256, "Width of the synthetic images, pixels.",
                         lower_bound=32)
    flags.DEFINE_list("synth_regions", ["V1", "MTG"], "Brain regions; the images of an "
                      "experiment alternate between them (V1 gets a thick layer 4).")
    flags.DEFINE_string("synth_study", "synthetic", "Value of the manifest's study column.")
    flags.DEFINE_integer("synth_jpeg_quality", 90, "JPEG quality of the images (1..100).",
                         lower_bound=1, upper_bound=100)
    flags.DEFINE_integer("synth_workers", 0, "Worker processes rendering images; 0 = render "
                         "in the main process.", lower_bound=0)


def synth_config(FLAGS) -> SynthConfig:  # noqa: F821, N803 - lazy import below
    """Converts the synth flags (and --seed, --small_run) into a `SynthConfig`.

    --small_run shrinks the set to at most 8 genes, one image per (gene, donor) and
    128 x 128 pixels.

    Raises:
      ValueError: --out is empty, or the values do not make a valid SynthConfig (the
        message names the field).
    """
    from ish_tf.data.synthetic import SynthConfig

    if not FLAGS.out:
        raise ValueError("--out is required: the directory to write the synthetic dataset to")
    n_genes, per_pair = FLAGS.n_genes, FLAGS.images_per_gene_donor
    height, width = FLAGS.synth_height, FLAGS.synth_width
    if FLAGS.small_run:
        n_genes, per_pair = min(n_genes, 8), 1
        height, width = min(height, 128), min(width, 128)
    return SynthConfig(
        out_dir=FLAGS.out, n_genes=n_genes, n_donors=FLAGS.n_donors,
        donors_per_gene=FLAGS.donors_per_gene, images_per_gene_donor=per_pair,
        height=height, width=width, regions=tuple(parse_list(FLAGS.synth_regions)),
        seed=FLAGS.seed, jpeg_quality=FLAGS.synth_jpeg_quality, study=FLAGS.synth_study,
        n_groups=min(FLAGS.n_groups, n_genes), workers=FLAGS.synth_workers)


# --------------------------------------------------------------------------- model
def define_model() -> None:
    """Flags of the model builders (`ish_tf.models`): architecture and initial weights."""
    if not _once("model"):
        return
    flags.DEFINE_string("model", "triplet",
                        "Model family / training task (registry key): triplet.")
    flags.DEFINE_enum("backbone", "resnet50", ["resnet50", "small_cnn"],
                      "Backbone network; each carries the preprocessing matching its weights.")
    flags.DEFINE_string("backbone_weights", "imagenet",
                        "imagenet | none | path to a weights file (.weights.h5) of the backbone.")
    flags.DEFINE_integer("input_size", 256, "Side of the square input images, in pixels.")
    flags.DEFINE_integer("embedding_dim", 128, "Embedding dimension D.")
    flags.DEFINE_integer("head_units", 1024, "Hidden units of the embedding head.")
    flags.DEFINE_bool("l2_normalize", False, "L2-normalise the embeddings.")
    flags.DEFINE_enum("head_batch_norm", "batch", ["batch", "sync", "none"],
                      "Head batch norm: per replica, synchronised across replicas, or none.")


def model_config(fv=FLAGS):
    """`ish_tf.models.ModelConfig` from the model flags (seed from --seed)."""
    from ish_tf.families import ModelConfig, family_options

    return ModelConfig(model=fv.model, backbone=fv.backbone, backbone_weights=fv.backbone_weights,
                       input_size=fv.input_size, embedding_dim=fv.embedding_dim,
                       head_units=fv.head_units, l2_normalize=fv.l2_normalize,
                       head_batch_norm=fv.head_batch_norm, seed=fv.seed,
                       options=family_options(fv.model, fv))


# --------------------------------------------------------------------------- train
def define_train() -> None:
    """Flags of bin/train (`ish_tf.train`): data, batch, loss, schedule, runtime."""
    if not _once("train"):
        return
    # Generic names other sections may define too (embed: --records_dir): define once.
    _define_once(flags.DEFINE_string, "run_dir", "runs/triplet",
                 "Run directory: flags.cfg, checkpoints/, logs/, metrics.csv, model.keras. "
                 "Rerunning with the same directory resumes.")
    _define_once(flags.DEFINE_string, "records_dir", "",
                 "TFRecord shards + index.json written by bin/extract.")
    _define_once(flags.DEFINE_string, "split", "train", "Split of the records to train on.")
    flags.DEFINE_integer("P", 17, "Genes per batch.")
    flags.DEFINE_integer("K", 17, "Patches per gene per batch (global batch = P*K).")
    flags.DEFINE_bool("flips", True, "Random horizontal and vertical flips.")
    flags.DEFINE_enum("mining", "batch_hard", ["batch_hard", "batch_all", "semi_hard"],
                      "Triplet mining over the global batch.")
    flags.DEFINE_string("margin", "soft", "Triplet margin: soft (softplus) or a number.")
    flags.DEFINE_enum("metric", "euclidean", ["euclidean", "sqeuclidean", "cityblock"],
                      "Embedding distance of the triplet loss.")
    flags.DEFINE_float("learning_rate", 7e-5, "Initial Adam learning rate.")
    flags.DEFINE_float("adam_epsilon", 1e-8, "Adam epsilon.")
    flags.DEFINE_integer("steps", 30000, "Total optimizer steps.")
    flags.DEFINE_integer("decay_start", 25000,
                         "Hold the learning rate until this step, then decay it exponentially.")
    flags.DEFINE_float("final_lr_fraction", 0.001, "Learning rate at --steps as a fraction of the initial one.")
    flags.DEFINE_enum("strategy", "auto", ["auto", "mirrored", "one_device", "default",
                                           "multi_worker"],
                      "tf.distribute strategy; auto = mirrored when more than one GPU is visible; "
                      "multi_worker = MultiWorkerMirroredStrategy from TF_CONFIG.")
    flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints.")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept on disk.")
    flags.DEFINE_integer("log_every", 100, "Steps between log lines, TensorBoard scalars and metrics.csv rows.")
    flags.DEFINE_bool("image_summaries", True, "Write a few input patches to TensorBoard at step 0.")
    flags.DEFINE_bool("mixed_precision", False,
                      "Mixed precision: float16 with loss scaling on GPU, bfloat16 on CPU.")
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
    flags.DEFINE_bool("deterministic", False, "Enable TensorFlow op determinism (slower).")


def train_config(fv=FLAGS):
    """`ish_tf.train.TrainConfig` from the train flags; --small_run shrinks it."""
    from ish_tf.train import TrainConfig

    cfg = TrainConfig(
        run_dir=fv.run_dir, records_dir=fv.records_dir, split=fv.split, P=fv.P, K=fv.K,
        flips=fv.flips, mining=fv.mining, margin=fv.margin, metric=fv.metric,
        learning_rate=fv.learning_rate, adam_epsilon=fv.adam_epsilon, steps=fv.steps,
        decay_start=fv.decay_start, final_lr_fraction=fv.final_lr_fraction, strategy=fv.strategy,
        checkpoint_every=fv.checkpoint_every, keep_checkpoints=fv.keep_checkpoints,
        log_every=fv.log_every,
        image_summaries=fv.image_summaries, mixed_precision=fv.mixed_precision,
        jit_compile=fv.jit_compile, deterministic=fv.deterministic, seed=fv.seed)
    if fv.small_run:
        cfg = cfg.shrunk_for_small_run()
    return cfg.validate()


# --------------------------------------------------------------------------- pipeline
def define_pipeline() -> None:
    """Flags of the tf.data readers (`ish_tf.data.pipeline`).

    --flips and --deterministic belong to the train section; `pipeline_config` uses
    them when defined (defining them here too would clash when both are requested).
    """
    if not _once("pipeline"):
        return
    flags.DEFINE_bool("standardize", False,
                      "Per-image standardisation (mean 0, std 1) instead of pixels in [0, 255].")
    flags.DEFINE_integer("shuffle_buffer", 4096,
                         "Records in the shuffle buffer of the plain reader (mixes genes, "
                         "which lie contiguous in the shards).", lower_bound=0)
    flags.DEFINE_integer("cycle_length", 0,
                         "Shards read concurrently by the plain reader (0 = number of cores).",
                         lower_bound=0)


def pipeline_config(fv=FLAGS):
    """`ish_tf.data.pipeline.PipelineConfig` from the pipeline flags (+ --flips,
    --deterministic when the train section defines them); --small_run shrinks the buffer."""
    from ish_tf.data.pipeline import PipelineConfig

    # getattr: absl raises AttributeError for flags that no section defined.
    flips = getattr(fv, "flips", True)
    deterministic = getattr(fv, "deterministic", False)
    shuffle_buffer = min(fv.shuffle_buffer, 256) if fv.small_run else fv.shuffle_buffer
    return PipelineConfig(flips=flips, standardize=fv.standardize,
                          shuffle_buffer=shuffle_buffer, deterministic=deterministic,
                          cycle_length=fv.cycle_length)


# --------------------------------------------------------------------------- extract
def define_extract() -> None:
    """Flags of `bin/extract` (manifest -> masks, patches, sharded TFRecords)."""
    if not _once("extract"):
        return
    _define_once(flags.DEFINE_string, "manifest", "", "Manifest CSV written by bin/fetch or bin/synth.")
    _define_once(flags.DEFINE_string, "out", "", "Output directory.")
    _define_once(flags.DEFINE_string, "genes", "", "Comma-separated genes to keep (or @FILE, one "
                 "per line); empty = all.")
    _define_once(flags.DEFINE_integer, "workers", 1, "Worker processes.", lower_bound=1)
    flags.DEFINE_integer("patches_per_image", 50, "N: most patches per image.", lower_bound=1)
    flags.DEFINE_integer("source_size", 1024, "S: side of a patch window in original-image "
                         "pixels.", lower_bound=1)
    flags.DEFINE_integer("patch_size", 256, "R: side of the stored (resized) patch.", lower_bound=1)
    flags.DEFINE_float("min_fraction", 0.9, "F: least tissue fraction of a window.",
                       lower_bound=0.0, upper_bound=1.0)
    flags.DEFINE_integer("max_tries", 500, "T: most random windows tried per image.", lower_bound=1)
    flags.DEFINE_enum("format", "jpeg", ["jpeg", "png"], "Encoding of stored patches.")
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of stored patches.", lower_bound=1,
                         upper_bound=95)
    flags.DEFINE_integer("num_shards", 4, "Most TFRecord shards per split (whole genes per "
                         "shard).", lower_bound=1)
    flags.DEFINE_enum("compression", "none", ["none", "gzip"], "TFRecord compression.")
    flags.DEFINE_enum("split_by", "gene", ["gene", "donor"], "Hold out unseen genes or unseen "
                      "donors in validation/test.")
    flags.DEFINE_string("split_fractions", "0.8,0.1,0.1", "train,validation,test fractions.")
    flags.DEFINE_enum("segmenter", "classical", ["classical", "unet"], "Foreground mask method.")
    flags.DEFINE_string("unet_path", "", "Trained U-Net .keras file for --segmenter=unet.")
    _define_mask_background()
    flags.DEFINE_integer("mask_work_size", 512, "Longest side of the resolution masks are "
                         "computed at.", lower_bound=16)
    flags.DEFINE_bool("save_overlays", False, "Also write OUT/overlays/{image_id}.png (mask "
                      "over image) for visual checks.")


def extract_config(FLAGS) -> ExtractConfig:  # noqa: F821, N803 - lazy import below
    """Converts the extract flags into an `ish_tf.data.patches.ExtractConfig`.

    Raises:
      ValueError: --split_fractions is not three numbers, or --genes names an unreadable file.
    """
    from ish_tf.data.patches import ExtractConfig
    from ish_tf.data.segment import MaskConfig

    try:
        fractions = tuple(float(v) for v in parse_list(FLAGS.split_fractions))
    except ValueError as e:
        raise ValueError(f"--split_fractions must be three numbers, got "
                         f"{FLAGS.split_fractions!r}") from e
    if len(fractions) != 3:
        raise ValueError(f"--split_fractions must be three numbers, got {FLAGS.split_fractions!r}")
    genes_flag = FLAGS.genes or ""
    if genes_flag.startswith("@"):
        try:
            with open(genes_flag[1:], encoding="utf-8") as f:
                genes = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise ValueError(f"--genes={genes_flag}: cannot read the gene list: {e}") from e
    else:
        genes = parse_list(genes_flag)
    mask = MaskConfig(segmenter=FLAGS.segmenter, unet_path=FLAGS.unet_path or None,
                      background=FLAGS.mask_background, work_size=FLAGS.mask_work_size)
    return ExtractConfig(
        manifest=FLAGS.manifest, out_dir=FLAGS.out,
        patches_per_image=FLAGS.patches_per_image, source_size=FLAGS.source_size,
        patch_size=FLAGS.patch_size, min_fraction=FLAGS.min_fraction, max_tries=FLAGS.max_tries,
        image_format=FLAGS.format, jpeg_quality=FLAGS.jpeg_quality, num_shards=FLAGS.num_shards,
        compression=None if FLAGS.compression == "none" else "GZIP", split_by=FLAGS.split_by,
        split_fractions=fractions, workers=FLAGS.workers, seed=FLAGS.seed, genes=tuple(genes),
        mask=mask, save_overlays=FLAGS.save_overlays)


# --------------------------------------------------------------------------- evaluate
def define_evaluate() -> None:
    """Flags of `bin/evaluate` (annotation/GO prediction, donor control, diagnosis, reid)."""
    if not _once("evaluate"):
        return
    flags.DEFINE_list("task", ["annotations"], "Tasks to run: annotations, diagnosis, reid.")
    flags.DEFINE_string("embedding", "", "One embedding table (CSV/Parquet; every numeric "
                        "non-key column is a dimension); named after its file.")
    flags.DEFINE_string("embeddings", "", "Several tables side by side: name=path,name=path,...")
    _define_once(flags.DEFINE_string, "out", "", "Output directory.")
    _define_once(flags.DEFINE_string, "manifest", "", "Manifest CSV written by bin/fetch or "
                 "bin/synth.")
    flags.DEFINE_string("zeng_table", "", "Zeng et al. 2012 Table S2 (.xlsx): pattern, level, "
                        "level_description, layer_marker, celltype_marker groups.")
    flags.DEFINE_string("gaf", "", "GO annotations, GAF 2.x (plain or .gz; symbols or NCBIGene ids).")
    flags.DEFINE_string("obo", "", "GO ontology (.obo) to propagate annotations up is_a edges.")
    flags.DEFINE_list("go_aspects", ["P", "F", "C"], "GO aspects kept: P, F, C.")
    flags.DEFINE_list("go_exclude_evidence", [], "GO evidence codes dropped, e.g. IEA.")
    flags.DEFINE_integer("go_min_genes", 40, "Smallest GO group, in matched genes.", lower_bound=1)
    flags.DEFINE_integer("go_max_genes", 200, "Largest GO group, in matched genes.", lower_bound=1)
    flags.DEFINE_list("annotations", [], "Generic annotation CSVs: gene_symbol and/or entrez_id "
                      "+ categorical columns, each value a group (e.g. bin/synth's annotations.csv).")
    flags.DEFINE_list("annotation_columns", [], "Columns of --annotations to use; empty = all "
                      "non-key columns.")
    flags.DEFINE_integer("min_group_genes", 5, "Groups with fewer matched genes are skipped.",
                         lower_bound=2)
    flags.DEFINE_integer("folds", 5, "Stratified cross-validation folds.", lower_bound=2)
    flags.DEFINE_integer("max_iter", 500, "Iteration cap of the logistic regression.",
                         lower_bound=1)
    flags.DEFINE_enum("solver", "newton-cg", ["newton-cg", "lbfgs", "newton-cholesky"],
                      "scikit-learn solver of the unpenalised logistic regression.")
    flags.DEFINE_bool("standardize_features", True, "z-score embedding dimensions inside each "
                      "fold (training part's mean/std): results do not depend on the scale.")
    flags.DEFINE_enum("join_key", "auto", ["auto", "gene_symbol", "entrez_id"],
                      "Key joining embeddings to annotations; auto = the one matching more genes.")
    flags.DEFINE_bool("common_genes", True, "Score all embeddings on the genes every one of them "
                      "matches (paired comparison).")
    flags.DEFINE_string("donor_matrix", "", "Gene x donor 0/1 assay matrix CSV, scored as "
                        "embedding 'donor_matrix' (donor-bias control).")
    flags.DEFINE_bool("donor_control", True, "With --manifest and no --donor_matrix, build the "
                      "donor matrix from the manifest and score it too.")
    flags.DEFINE_string("diagnosis_label", "diagnosis", "Manifest column labelling donors.")
    flags.DEFINE_string("diagnosis_positive", "schizophrenia", "Value of the positive class.")
    flags.DEFINE_string("diagnosis_negative", "control", "Value of the negative class; empty = "
                        "every other value.")
    flags.DEFINE_integer("min_donors", 40, "Diagnosis: genes assayed in fewer labelled donors "
                         "are skipped.", lower_bound=2)
    flags.DEFINE_list("demographics", ["donor_age", "pmi", "tissue_ph", "smoker", "donor_sex",
                                       "donor_race"],
                      "Diagnosis covariates (numeric as is, others one-hot).")
    flags.DEFINE_integer("top_genes", 20, "Rows of OUT/diagnosis_top.csv.", lower_bound=1)
    flags.DEFINE_enum("reid_level", "image", ["image", "patch", "donor"],
                      "Level re-identification runs at (patch tables are averaged up).")
    flags.DEFINE_enum("reid_metric", "euclidean", ["euclidean", "sqeuclidean", "cosine",
                                                   "cityblock"], "Re-identification distance.")
    flags.DEFINE_bool("report", True, "Write figures/ and report.html for the tasks that ran.")
    flags.DEFINE_enum("map_method", "pca", ["pca", "tsne", "umap", "auto", "none"],
                      "Projection of the per-embedding gene maps in the report (tsne: nicer, "
                      "~15-60 s per embedding on 2 cores; none: no maps).")
    flags.DEFINE_integer("n_jobs", 2, "Processes scoring groups (or genes) in parallel.",
                         lower_bound=1)
    # The paper's Fig 3: the patches of one gene that most and least activate a dimension.
    flags.DEFINE_string("patch_embeddings", "", "Patch-level table from bin/embed; with "
                        "--records_dir and --extreme_gene adds the extreme-patches figure.")
    _define_once(flags.DEFINE_string, "records_dir", "", "TFRecord shards + index.json "
                 "(from bin/extract) holding the patches of --patch_embeddings.")
    flags.DEFINE_string("extreme_gene", "", "Gene whose extreme patches are shown.")
    flags.DEFINE_integer("extreme_dim", -1, "Embedding dimension for the extreme-patches "
                         "figure; -1 = the dimension varying most over that gene's patches.")


def parse_named_paths(value: str) -> dict[str, str]:
    """`name=path,name=path` (or bare paths, named after the file) to an ordered dict.

    Raises:
      ValueError: a name repeats or is empty.
    """
    out: dict[str, str] = {}
    for item in parse_list(value):
        name, sep, path = item.partition("=")
        if not sep:
            path = item
            name = os.path.splitext(os.path.basename(item))[0]
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ValueError(f"--embeddings item {item!r} must be name=path")
        if name in out:
            raise ValueError(f"--embeddings names {name!r} twice")
        out[name] = path
    return out


def evaluate_config(FLAGS) -> EvaluateConfig:  # noqa: F821, N803 - lazy import below
    """Converts the evaluate flags (and --seed) into an `ish_tf.evaluate.EvaluateConfig`.

    Raises:
      ValueError: --out is empty, --embeddings is malformed, or a task lacks its inputs.
    """
    from ish_tf.evaluate import EvaluateConfig
    from ish_tf.evaluate.annotations import ScoringConfig
    from ish_tf.evaluate.diagnosis import DiagnosisConfig

    if not FLAGS.out:
        raise ValueError("--out is required: the directory to write results to")
    embeddings = parse_named_paths(FLAGS.embedding)
    for name, path in parse_named_paths(FLAGS.embeddings).items():
        if name in embeddings:
            raise ValueError(f"embedding name {name!r} given by both --embedding and --embeddings")
        embeddings[name] = path
    scoring = ScoringConfig(
        n_splits=FLAGS.folds, seed=FLAGS.seed, standardize=FLAGS.standardize_features,
        max_iter=FLAGS.max_iter, solver=FLAGS.solver, min_genes=FLAGS.min_group_genes,
        size_bounds={"go": (FLAGS.go_min_genes, FLAGS.go_max_genes)}, n_jobs=FLAGS.n_jobs)
    diagnosis = DiagnosisConfig(
        label_column=FLAGS.diagnosis_label, positive=FLAGS.diagnosis_positive,
        negative=FLAGS.diagnosis_negative, min_donors=FLAGS.min_donors,
        demographics=tuple(parse_list(FLAGS.demographics)), n_splits=FLAGS.folds,
        seed=FLAGS.seed, standardize=FLAGS.standardize_features, max_iter=FLAGS.max_iter,
        solver=FLAGS.solver, n_jobs=FLAGS.n_jobs)
    return EvaluateConfig(
        tasks=tuple(parse_list(FLAGS.task)), embeddings=embeddings, out_dir=FLAGS.out,
        zeng_table=FLAGS.zeng_table, gaf=FLAGS.gaf, obo=FLAGS.obo,
        go_aspects=tuple(parse_list(FLAGS.go_aspects)),
        go_exclude_evidence=tuple(parse_list(FLAGS.go_exclude_evidence)),
        annotation_tables=tuple(parse_list(FLAGS.annotations)),
        annotation_columns=tuple(parse_list(FLAGS.annotation_columns)),
        donor_matrix=FLAGS.donor_matrix, manifest=FLAGS.manifest,
        donor_control=FLAGS.donor_control, join_key=FLAGS.join_key,
        common_genes=FLAGS.common_genes, scoring=scoring, diagnosis=diagnosis,
        top_genes=FLAGS.top_genes, reid_level=FLAGS.reid_level, reid_metric=FLAGS.reid_metric,
        report=FLAGS.report, map_method=FLAGS.map_method,
        patch_embeddings=FLAGS.patch_embeddings, records_dir=FLAGS.records_dir,
        extreme_gene=FLAGS.extreme_gene, extreme_dim=FLAGS.extreme_dim).validate()


# --------------------------------------------------------------------------- export
def define_export() -> None:
    """Flags of `bin/export` (RUN/model.keras -> versioned SavedModel EXPORT/<name>/<v>/)."""
    if not _once("export"):
        return
    flags.DEFINE_string("model_dir", "", "Training run directory RUN (holding model.keras, "
                        "model_config.json, flags.cfg), or a .keras file.")
    flags.DEFINE_string("export_dir", "", "Export base EXPORT/<name>: versions are written "
                        "to integer subdirectories (TF Serving's model base path).")
    flags.DEFINE_string("family", "", "Model family (sets the output names); empty = the "
                        "builder in RUN/model_config.json, else triplet.")
    flags.DEFINE_integer("version", 0, "Version number to write; 0 = newest + 1.", lower_bound=0)
    flags.DEFINE_integer("keep", 5, "Keep only the newest N versions after exporting; 0 = all.",
                         lower_bound=0)
    flags.DEFINE_bool("overwrite", False, "Replace --version if it already exists.")


def export_config(fv=FLAGS) -> ExportConfig:  # noqa: F821 - lazy import below
    """`ish_tf.export.ExportConfig` from the export flags.

    Raises:
      ish_tf.export.ExportError (a ValueError): a required flag is empty.
    """
    from ish_tf.export.saved_model import ExportConfig

    return ExportConfig(model_dir=fv.model_dir, export_dir=fv.export_dir, family=fv.family,
                        version=fv.version or None, keep=fv.keep,
                        overwrite=fv.overwrite).validate()


# --------------------------------------------------------------------------- embed
def define_embed() -> None:
    """Flags of `bin/embed` (SavedModel + TFRecord patches -> patch/image/donor/gene tables)."""
    if not _once("embed"):
        return
    flags.DEFINE_string("saved_model", "", "Export base EXPORT/<name> (newest version) or a "
                        "SavedModel version directory written by bin/export.")
    _define_once(flags.DEFINE_string, "records_dir", "", "TFRecord shards + index.json "
                 "written by bin/extract.")
    _define_once(flags.DEFINE_string, "out", "", "Output directory.")
    flags.DEFINE_list("splits", [], "Splits to embed (train, validation, test); empty = all.")
    flags.DEFINE_integer("embed_batch_size", 64, "Patches per call of the serving signature.",
                         lower_bound=1)
    flags.DEFINE_enum("gene_from", "patches", ["patches", "images"],
                      "Donor and gene vectors: mean of all their patches (the paper) or mean "
                      "of their image means.")
    flags.DEFINE_enum("table_format", "csv", ["csv", "parquet"],
                      "Format of the embedding tables (parquet needs pyarrow).")
    flags.DEFINE_string("signature", "serving_default",
                        "Signature fed with the encoded patch bytes.")
    flags.DEFINE_string("output_key", "", "Output of the signature to store; empty = the "
                        "export's first output (embedding for triplet).")
    flags.DEFINE_list("levels", ["patch", "image", "donor", "gene"], "Tables to write.")
    flags.DEFINE_string("projector_dir", "", "Also write a TensorBoard embedding-projector view "
                        "of the gene-level embeddings (labelled by gene) here; open it with "
                        "tensorboard --logdir DIR. Empty = none.")


def embed_config(fv=FLAGS) -> EmbedConfig:  # noqa: F821 - lazy import below
    """`ish_tf.embed.EmbedConfig` from the embed flags.

    Raises:
      ish_tf.embed.EmbedError (a ValueError): a required flag is empty or a value is invalid.
    """
    from ish_tf.embed import EmbedConfig

    return EmbedConfig(
        saved_model=fv.saved_model, records_dir=fv.records_dir, out_dir=fv.out,
        splits=tuple(parse_list(fv.splits)), batch_size=fv.embed_batch_size,
        gene_from=fv.gene_from, table_format=fv.table_format, signature=fv.signature,
        output=fv.output_key or None, levels=tuple(parse_list(fv.levels))).validate()


# --------------------------------------------------------------------------- unet
def define_unet() -> None:
    """Flags of `bin/train --model=unet` (the U-Net tissue segmenter on image/mask pairs)."""
    if not _once("unet"):
        return
    flags.DEFINE_string("mask_manifest", "", "--model=unet: manifest CSV whose images have "
                        "true tissue masks (bin/synth writes masks/{image_id}.png beside it).")
    flags.DEFINE_string("mask_dir", "", "--model=unet: directory of the masks "
                        "{image_id}.png; empty = masks/ beside --mask_manifest.")
    flags.DEFINE_float("val_fraction", 0.1, "--model=unet: fraction of the pairs held out "
                       "(listed in RUN/unet_split.csv, never trained on).",
                       lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_integer("unet_batch_size", 8, "--model=unet: image/mask pairs per step "
                         "(global batch).", lower_bound=1)
    flags.DEFINE_integer("unet_filters", 16, "--model=unet: filters of the first level "
                         "(doubled at each level down).", lower_bound=1)
    flags.DEFINE_integer("unet_depth", 4, "--model=unet: number of 2x downsamplings; "
                         "--input_size must be divisible by 2**depth.", lower_bound=1)


def unet_options(fv=FLAGS) -> dict:
    """`ModelConfig.options` of the U-Net family from its flags (`FAMILY_OPTIONS["unet"]`).

    Flags of a section the command did not define fall back to their defaults, so any
    command that builds a `ModelConfig` with --model=unet works. --small_run caps the
    batch at 4 pairs.

    Returns:
      {"base_filters", "depth", "batch_size", "mask_manifest", "mask_dir", "val_fraction"}.
    """
    # getattr: absl raises AttributeError for flags no section defined.
    batch = int(getattr(fv, "unet_batch_size", 8))
    if getattr(fv, "small_run", False):
        batch = min(batch, 4)
    return {"base_filters": int(getattr(fv, "unet_filters", 16)),
            "depth": int(getattr(fv, "unet_depth", 4)),
            "batch_size": batch,
            "mask_manifest": str(getattr(fv, "mask_manifest", "") or ""),
            "mask_dir": str(getattr(fv, "mask_dir", "") or ""),
            "val_fraction": float(getattr(fv, "val_fraction", 0.1))}


# --------------------------------------------------------------------------- cdae
# Defaults of the CDAE flags, also used by `cdae_options` when a command did not define
# the section (any command building a ModelConfig with --model=cdae still works).
_CDAE_DEFAULTS: dict = {
    "cdae_depth": 4, "cdae_filters": "16,32,64,64", "cdae_convs_per_block": 1,
    "cdae_code_size": 128, "cdae_code_pooling": "flatten",
    "cdae_norm": "batch", "unpool": "switches", "cdae_invert": True, "cdae_aspect": 1.0,
    "cdae_noise": "masking", "cdae_noise_level": 0.25, "cdae_loss": "bce",
    "cdae_batch_size": 32, "cdae_image_every": 500, "cdae_bn_images": 2048, "cdae_dropout": 0.0,
    "cdae_init_from": "", "cdae_gaf": "", "cdae_annotations": "",
    "cdae_term_min_genes": 15, "cdae_term_max_genes": 500,
}


def define_cdae() -> None:
    """Flags of `bin/train --model=cdae|cdae_supervised` (convolutional denoising autoencoder)."""
    if not _once("cdae"):
        return
    d = _CDAE_DEFAULTS
    flags.DEFINE_integer("cdae_depth", d["cdae_depth"], "--model=cdae: conv+pool blocks "
                         "(each halves the size); --input_size must be >= 2**depth.",
                         lower_bound=1)
    flags.DEFINE_string("cdae_filters", d["cdae_filters"], "--model=cdae: filters per block, "
                        "comma-separated (the last repeats if fewer than --cdae_depth).")
    flags.DEFINE_integer("cdae_convs_per_block", d["cdae_convs_per_block"],
                         "--model=cdae: 3x3 convolutions per block.", lower_bound=1)
    flags.DEFINE_integer("cdae_code_size", d["cdae_code_size"], "--model=cdae: size of the "
                         "dense code (the representation bin/embed stores).", lower_bound=1)
    flags.DEFINE_enum("cdae_code_pooling", d["cdae_code_pooling"], ["flatten", "average"],
                      "--model=cdae*: what the code is computed from: the flattened last "
                      "pooled block (where and what), or the average of the last block's "
                      "features over all positions (translation-invariant: the decoder gets "
                      "the layout from the switches).")
    flags.DEFINE_enum("cdae_norm", d["cdae_norm"], ["batch", "none"], "--model=cdae*: batch "
                      "normalisation between each 3x3 convolution and its ReLU (without it "
                      "the quickstart CDAE barely beats the mean image in reconstruction).")
    flags.DEFINE_enum("unpool", d["unpool"], ["switches", "nearest"], "--model=cdae: decoder "
                      "unpooling: max-unpool at the encoder's switches, or nearest upsampling.")
    flags.DEFINE_bool("cdae_invert", d["cdae_invert"], "--model=cdae: scale pixels to "
                      "1 - x/255 inside the model (white slide -> 0, stain -> 1); fluorescence "
                      "sections (--mask_background=dark) want --nocdae_invert, and training "
                      "warns when the records say otherwise.")
    flags.DEFINE_float("cdae_aspect", d["cdae_aspect"], "--model=cdae: input width / height "
                       "(height = --input_size); must match the whole-image records.")
    flags.DEFINE_enum("cdae_noise", d["cdae_noise"], ["none", "gaussian", "masking",
                                                      "salt_pepper"],
                      "--model=cdae: input corruption while training (in the [0, 1] scaled "
                      "space): additive gaussian (std = level), masking (a fraction `level` of "
                      "pixels set to 0) or salt-and-pepper (a fraction `level` set to 0 or 1).")
    flags.DEFINE_float("cdae_noise_level", d["cdae_noise_level"], "--model=cdae: noise std or "
                       "corrupted fraction.", lower_bound=0.0)
    flags.DEFINE_enum("cdae_loss", d["cdae_loss"], ["mse", "bce"], "--model=cdae: "
                      "reconstruction loss against the clean scaled image.")
    flags.DEFINE_integer("cdae_batch_size", d["cdae_batch_size"], "--model=cdae*: images per "
                         "step (global batch; replaces P*K).", lower_bound=1)
    flags.DEFINE_integer("cdae_image_every", d["cdae_image_every"], "--model=cdae: steps "
                         "between TensorBoard images of input / noisy input / reconstruction "
                         "(logs/reconstruction); 0 = only at step 0.", lower_bound=0)
    flags.DEFINE_integer("cdae_bn_images", d["cdae_bn_images"], "--model=cdae with "
                         "--cdae_norm=batch: clean training images on which the final model's "
                         "batch-normalisation statistics are re-estimated before model.keras is "
                         "written (training saw corrupted images, so the moving averages "
                         "describe those); 0 = keep the moving averages.", lower_bound=0)
    flags.DEFINE_float("cdae_dropout", d["cdae_dropout"], "--model=cdae_supervised: dropout "
                       "before the sigmoid head.", lower_bound=0.0, upper_bound=0.95)
    flags.DEFINE_string("cdae_init_from", d["cdae_init_from"], "--model=cdae_supervised: a "
                        "CDAE run directory (or .keras) to initialise the encoder from; "
                        "empty = from scratch.")
    flags.DEFINE_string("cdae_gaf", d["cdae_gaf"], "--model=cdae_supervised: GAF file of the "
                        "terms to predict (bin/synth writes OUT/go.gaf).")
    flags.DEFINE_string("cdae_annotations", d["cdae_annotations"], "--model=cdae_supervised: "
                        "or a gene annotation CSV (gene_symbol + categorical columns).")
    flags.DEFINE_integer("cdae_term_min_genes", d["cdae_term_min_genes"],
                         "--model=cdae_supervised: terms with fewer training genes are left "
                         "out.", lower_bound=1)
    flags.DEFINE_integer("cdae_term_max_genes", d["cdae_term_max_genes"],
                         "--model=cdae_supervised: terms with more training genes are left "
                         "out.", lower_bound=1)


def cdae_options(fv=FLAGS) -> dict:
    """`ModelConfig.options` of cdae / cdae_supervised from the --cdae_* flags.

    Flags of a section the command did not define fall back to their defaults;
    --small_run caps the batch at 8 images.

    Returns:
      {"depth", "filters", "convs_per_block", "code_size", "code_pooling", "norm", "unpool",
       "invert", "aspect",
       "noise", "noise_level", "loss", "batch_size", "image_every", "bn_images", "dropout",
       "init_from", "gaf", "annotations", "term_min_genes", "term_max_genes"}
      (documented in `ish_tf.families.cdae.model` and `ish_tf.families.cdae.task`).
    """
    # getattr: absl raises AttributeError for flags no section defined.
    v = {name: getattr(fv, name, default) for name, default in _CDAE_DEFAULTS.items()}
    batch = int(v["cdae_batch_size"])
    if getattr(fv, "small_run", False):
        batch = min(batch, 8)
    return {
        "depth": int(v["cdae_depth"]),
        "filters": [int(f) for f in parse_list(v["cdae_filters"])],
        "convs_per_block": int(v["cdae_convs_per_block"]), "code_size": int(v["cdae_code_size"]),
        "code_pooling": str(v["cdae_code_pooling"]), "norm": str(v["cdae_norm"]),
        "unpool": str(v["unpool"]), "invert": bool(v["cdae_invert"]),
        "aspect": float(v["cdae_aspect"]), "noise": str(v["cdae_noise"]),
        "noise_level": float(v["cdae_noise_level"]), "loss": str(v["cdae_loss"]),
        "batch_size": batch, "image_every": int(v["cdae_image_every"]),
        "bn_images": int(v["cdae_bn_images"]),
        "dropout": float(v["cdae_dropout"]), "init_from": str(v["cdae_init_from"] or ""),
        "gaf": str(v["cdae_gaf"] or ""), "annotations": str(v["cdae_annotations"] or ""),
        "term_min_genes": int(v["cdae_term_min_genes"]),
        "term_max_genes": int(v["cdae_term_max_genes"]),
    }


# --------------------------------------------------------------------------- whole images
def define_whole() -> None:
    """Flags of whole-section records (`bin/extract --whole_images`, `ish_tf.data.whole`)."""
    if not _once("whole"):
        return
    flags.DEFINE_bool("whole_images", False, "bin/extract: write one downsampled grayscale "
                      "whole section per record (cropped to the tissue mask's bounding box, "
                      "padded to --whole_aspect with the slide background) instead of patches.")
    flags.DEFINE_integer("whole_size", 128, "Height of the stored whole sections, pixels.",
                         lower_bound=8)
    flags.DEFINE_float("whole_aspect", 1.0, "Width / height of the stored whole sections.",
                       lower_bound=0.05)
    flags.DEFINE_float("whole_margin", 0.02, "Margin around the tissue's bounding box, as a "
                       "fraction of its longer side.", lower_bound=0.0, upper_bound=1.0)


def whole_config(fv=FLAGS):
    """`ish_tf.data.whole.WholeConfig` from the extract flags (manifest, out, genes, shards,
    splits, mask, workers, seed, --format) and the --whole_* flags.

    Raises:
      ValueError: as `extract_config`, or a bad whole-image setting.
    """
    from ish_tf.data.patches import RecordSetConfig
    from ish_tf.data.whole import WholeConfig

    ext = extract_config(fv)
    shared = {f.name: getattr(ext, f.name) for f in dataclasses.fields(RecordSetConfig)}
    return WholeConfig(size=fv.whole_size, aspect=fv.whole_aspect, margin=fv.whole_margin,
                       **shared)


# --------------------------------------------------------------------------- cdae tools
def define_cdae_tools() -> None:
    """Flags of `bin/cdae baselines|term_auc` (after a CDAE or cdae_supervised run)."""
    if not _once("cdae_tools"):
        return
    _define_once(flags.DEFINE_string, "run_dir", "", "A cdae (baselines) or cdae_supervised "
                 "(term_auc) training run.")
    _define_once(flags.DEFINE_string, "records_dir", "", "Whole-section records; empty = the run's.")
    _define_once(flags.DEFINE_string, "split", "test", "term_auc: the held-out split to score.")
    flags.DEFINE_string("codes_run", "", "term_auc: a CDAE run (or .keras file) whose codes + "
                        "logistic regression (fit on the other splits' genes) are scored on "
                        "the same genes; empty = the supervised run's --cdae_init_from.")
    _define_once(flags.DEFINE_string, "out", "", "Output directory; empty = RUN (term_auc) or "
                 "RUN/baselines.")


# --------------------------------------------------------------------------- tune
def define_tune() -> None:
    """Flags of `bin/tune` (KerasTuner search over bin/train runs; see ish_tf.tune)."""
    if not _once("tune"):
        return
    _define_once(flags.DEFINE_string, "out", "", "Output directory.")
    flags.DEFINE_enum("tuner", "random", ["grid", "random", "bayesian", "hyperband"],
                      "KerasTuner oracle choosing each trial's hyperparameters.")
    flags.DEFINE_integer("max_trials", 20, "Most trials (hyperband: its own budget too).",
                         lower_bound=1)
    flags.DEFINE_integer("executions_per_trial", 1, "Trainings per trial (seeds seed, seed+1, "
                         "...); the objective is their mean.", lower_bound=1)
    flags.DEFINE_float("steps_scale", 1.0, "Multiplies each trial's --steps (small runs); "
                       "best.cfg keeps the full length.")
    flags.DEFINE_string("validation_split", "validation", "Split the objective is computed on.")
    flags.DEFINE_integer("val_batch_size", 64, "Patches per inference batch when scoring.",
                         lower_bound=1)
    flags.DEFINE_integer("val_batches", 20, "Validation batches of the task loss (families "
                         "scored by validation loss).", lower_bound=1)
    flags.DEFINE_bool("tune_overwrite", False, "Discard an existing search in --out instead "
                      "of resuming it.")
    flags.DEFINE_integer("hyperband_max_epochs", 9, "Hyperband's largest budget, in units of "
                         "max(--tune_steps)/hyperband_max_epochs steps.", lower_bound=1)
    flags.DEFINE_integer("hyperband_factor", 3, "Hyperband's reduction factor.", lower_bound=2)
    flags.DEFINE_list("tune_flips", ["true", "false"], "Search values of --flips.")
    flags.DEFINE_list("tune_P", ["5", "10", "12", "14", "16", "17", "18", "20", "40", "50", "60"],
                      "Search values of --P (genes per batch); K = tune_batch_images // P.")
    flags.DEFINE_integer("tune_batch_images", 300, "Images per global batch of a trial.",
                         lower_bound=4)
    flags.DEFINE_list("tune_margin", ["soft", "0.5", "1"], "Search values of --margin.")
    flags.DEFINE_list("tune_learning_rate", ["1e-4", "9e-5", "8e-5", "7e-5", "6e-5", "5e-5",
                                             "1e-5"], "Search values of --learning_rate.")
    flags.DEFINE_list("tune_metric", ["euclidean", "sqeuclidean", "cityblock"],
                      "Search values of --metric.")
    flags.DEFINE_list("tune_steps", ["10000", "15000", "20000", "30000"],
                      "Search values of --steps (before --steps_scale).")


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"--{name}: {text!r} is not true or false")


def _parse_numbers(name: str, values, kind):
    try:
        return tuple(kind(float(v)) if kind is int else kind(v) for v in parse_list(values))
    except ValueError as e:
        raise ValueError(f"--{name}: expected a comma-separated list of numbers, got "
                         f"{values!r}") from e


def tune_config(fv=FLAGS):
    """`ish_tf.tune.TuneConfig` from the tune flags (and --seed, --small_run).

    Raises:
      ish_tf.tune.TuneError (a ValueError): a value is malformed or out of range.
    """
    from ish_tf.tune import TuneConfig, TuneSpace

    space = TuneSpace(
        flips=tuple(_parse_bool("tune_flips", v) for v in parse_list(fv.tune_flips)),
        P=_parse_numbers("tune_P", fv.tune_P, int), batch_images=fv.tune_batch_images,
        margin=tuple(parse_list(fv.tune_margin)),
        learning_rate=_parse_numbers("tune_learning_rate", fv.tune_learning_rate, float),
        metric=tuple(parse_list(fv.tune_metric)),
        steps=_parse_numbers("tune_steps", fv.tune_steps, int))
    return TuneConfig(
        out_dir=fv.out, tuner=fv.tuner, max_trials=fv.max_trials,
        executions_per_trial=fv.executions_per_trial, steps_scale=fv.steps_scale,
        validation_split=fv.validation_split, val_batch_size=fv.val_batch_size,
        val_batches=fv.val_batches, space=space, overwrite=fv.tune_overwrite,
        hyperband_max_epochs=fv.hyperband_max_epochs, hyperband_factor=fv.hyperband_factor,
        small_run=fv.small_run, seed=fv.seed).validate()


# --------------------------------------------------------------------------- quickstart
def define_quickstart() -> None:
    """Flags of `bin/quickstart` (besides the synth, extract, model and train sections)."""
    if not _once("quickstart"):
        return
    flags.DEFINE_string("workdir", "work/quickstart", "Directory for every stage's output.")
    flags.DEFINE_integer("embed_batch_size_qs", 128,
                         "Patches per call of the served model when the quickstart embeds.")


# --------------------------------------------------------------------------- ish_cnn
# Defaults of the ISH CNN flags, also used by `ish_cnn_options` when a command did not
# define the section.
_ISH_CNN_DEFAULTS: dict = {
    "ish_cnn_filters": "16,32,64,64,96", "ish_cnn_convs_per_block": 2, "ish_cnn_max_blocks": 5,
    "ish_cnn_pooling": "avg", "ish_cnn_dropout": 0.3, "ish_cnn_batch_norm": True,
    "ish_cnn_classes": "", "ish_cnn_intensity_jitter": 0.15,
}


def define_ish_cnn() -> None:
    """Flags of `bin/train --model=ish_cnn` (the patch classifier of `ish_tf.families.ish_cnn.model`).

    The patch size is --input_size; --records_dir may be bin/spatial's output (the
    record set p{input_size}/ is used) and --P/--K are classes / patches per class.
    """
    if not _once("ish_cnn"):
        return
    d = _ISH_CNN_DEFAULTS
    flags.DEFINE_string("ish_cnn_filters", d["ish_cnn_filters"], "--model=ish_cnn: filters "
                        "per conv block, comma-separated (the last repeats).")
    flags.DEFINE_integer("ish_cnn_convs_per_block", d["ish_cnn_convs_per_block"],
                         "--model=ish_cnn: 3x3 valid convolutions per block.", lower_bound=1)
    flags.DEFINE_integer("ish_cnn_max_blocks", d["ish_cnn_max_blocks"], "--model=ish_cnn: most "
                         "conv blocks (each halves the size; fewer when the patch is small).",
                         lower_bound=1)
    flags.DEFINE_enum("ish_cnn_pooling", d["ish_cnn_pooling"], ["avg", "flatten"],
                      "--model=ish_cnn: global average pooling, or flatten (position-aware).")
    flags.DEFINE_float("ish_cnn_dropout", d["ish_cnn_dropout"], "--model=ish_cnn: dropout "
                       "before the softmax layer.", lower_bound=0.0, upper_bound=0.95)
    flags.DEFINE_bool("ish_cnn_batch_norm", d["ish_cnn_batch_norm"], "--model=ish_cnn: batch "
                      "normalisation after each convolution.")
    flags.DEFINE_string("ish_cnn_classes", d["ish_cnn_classes"], "--model=ish_cnn: expected "
                        "class names, comma-separated; empty = read from the records.")
    flags.DEFINE_float("ish_cnn_intensity_jitter", d["ish_cnn_intensity_jitter"],
                       "--model=ish_cnn: training images are multiplied by a random factor "
                       "in [1 - x, 1 + x] (robustness to stain and slide brightness).",
                       lower_bound=0.0, upper_bound=0.9)


def ish_cnn_options(fv=FLAGS) -> dict:
    """`ModelConfig.options` of the ISH CNN from its flags (`FAMILY_OPTIONS["ish_cnn"]`).

    Returns:
      {"filters", "convs_per_block", "max_blocks", "pooling", "dropout", "batch_norm",
       "intensity_jitter"}
      plus "classes" when --ish_cnn_classes is set (documented in `ish_tf.families.ish_cnn.model`).

    Raises:
      ValueError: --ish_cnn_filters is not a list of positive integers.
    """
    # getattr: absl raises AttributeError for flags no section defined.
    v = {name: getattr(fv, name, default) for name, default in _ISH_CNN_DEFAULTS.items()}
    try:
        filters = [int(f) for f in parse_list(v["ish_cnn_filters"])]
    except ValueError as e:
        raise ValueError(f"--ish_cnn_filters must be integers, got {v['ish_cnn_filters']!r}") from e
    if not filters or min(filters) < 1:
        raise ValueError(f"--ish_cnn_filters must be positive integers, got {v['ish_cnn_filters']!r}")
    out = {"filters": filters, "convs_per_block": int(v["ish_cnn_convs_per_block"]),
           "max_blocks": int(v["ish_cnn_max_blocks"]), "pooling": str(v["ish_cnn_pooling"]),
           "dropout": float(v["ish_cnn_dropout"]), "batch_norm": bool(v["ish_cnn_batch_norm"]),
           "intensity_jitter": float(v["ish_cnn_intensity_jitter"])}
    classes = parse_list(v["ish_cnn_classes"])
    if classes:
        out["classes"] = classes
    return out


# --------------------------------------------------------------------------- spatial
def _define_outside_enum(name: str, default: str, help_text: str) -> None:
    """DEFINE_enum in the (name, default, help) form `_define_once` calls."""
    flags.DEFINE_enum(name, default, ["error", "drop"], help_text)


def define_spatial() -> None:
    """Flags of `bin/spatial` (sections + spot tables -> labels -> record sets per patch size)."""
    if not _once("spatial"):
        return
    _define_once(flags.DEFINE_string, "out", "", "Output directory.")
    _define_once(flags.DEFINE_string, "genes", "", "Comma-separated genes (the gene classes, "
                 "in label order).")
    flags.DEFINE_string("section_images", "", "Section images (TIFF/PNG), comma-separated.")
    flags.DEFINE_string("spot_tables", "", "Spot table CSVs (x, y, gene), one per image.")
    flags.DEFINE_string("section_masks", "", "Tissue mask PNGs, one per image; empty = "
                        "computed with the classical segmenter.")
    _define_mask_background()
    _define_once(flags.DEFINE_float, "spot_scale", 1.0, "Spot table units -> image pixels "
                 "(e.g. 0.5 for an image downsampled twice).")
    _define_once(_define_outside_enum, "outside_spots", "error", "Spots outside the image: "
                 "error (stop, naming the row) or drop.")
    flags.DEFINE_string("patch_sizes", "16,32,48,64,128", "Patch sides in pixels; one record "
                        "set OUT/p{R} (and one model) each.")
    flags.DEFINE_float("label_radius", 8.0, "Radius (px): a gene spot nearer than this to "
                       "another chosen gene's spot is ambiguous; tissue centres keep this "
                       "distance from every chosen gene's spot.", lower_bound=0.0)
    flags.DEFINE_bool("keep_ambiguous", False, "Keep ambiguous gene spots (labelled with "
                      "their own gene) instead of skipping them.")
    flags.DEFINE_integer("max_per_class", 2000, "Most patch centres per class and section; "
                         "0 = all gene spots, and as many tissue/background centres as the "
                         "largest gene class.", lower_bound=0)
    flags.DEFINE_bool("balance_classes", True, "Cut every class to the smallest one's count.")
    flags.DEFINE_float("validation_fraction", 0.1, "Share of each class's centres written to "
                       "the validation split.", lower_bound=0.0, upper_bound=0.9)
    flags.DEFINE_string("synthetic_pair", "", "Generate a synthetic pair of sections (two "
                        "animals) into this directory first; without --section_images the "
                        "first animal is labelled (the second is the independent test).")
    flags.DEFINE_integer("synthetic_size", 512, "Side of the synthetic sections, pixels.",
                         lower_bound=64)


def _mask_config(fv):
    """The classical segmenter's settings for sections without a mask file."""
    from ish_tf.data.segment import MaskConfig

    return MaskConfig(background=fv.mask_background)


def spatial_config(fv=FLAGS):
    """`ish_tf.families.ish_cnn.spatial.SpatialConfig` (+ the synthetic settings or None) from the flags.

    Returns:
      (SpatialConfig, SpatialSynthConfig or None).

    Raises:
      ValueError (SpatialError): missing inputs or invalid values, naming the flag.
    """
    from ish_tf.families.ish_cnn.spatial import LabelConfig, SpatialConfig, SpatialError
    from ish_tf.families.ish_cnn.synthetic_pairs import SpatialSynthConfig

    synth = None
    images, spots, masks = (tuple(parse_list(fv.section_images)),
                            tuple(parse_list(fv.spot_tables)), tuple(parse_list(fv.section_masks)))
    genes = tuple(parse_list(fv.genes))
    if fv.synthetic_pair:
        kw = {"genes": genes} if genes else {}
        synth = SpatialSynthConfig(out_dir=fv.synthetic_pair, height=fv.synthetic_size,
                                   width=fv.synthetic_size, seed=fv.seed, **kw)
        genes = synth.genes
        if not images:
            d = fv.synthetic_pair
            images = (os.path.join(d, "animal0.png"),)
            spots = (os.path.join(d, "animal0_spots.csv"),)
            masks = (os.path.join(d, "animal0_mask.png"),)
    if not genes:
        raise SpatialError("--genes is required: the gene classes, e.g. --genes=Sst,Pvalb")
    try:
        sizes = tuple(int(v) for v in parse_list(fv.patch_sizes))
    except ValueError as e:
        raise SpatialError(f"--patch_sizes must be integers, got {fv.patch_sizes!r}") from e
    labels = LabelConfig(genes=genes, radius=fv.label_radius, keep_ambiguous=fv.keep_ambiguous,
                         max_per_class=fv.max_per_class, balance=fv.balance_classes, seed=fv.seed)
    cfg = SpatialConfig(images=images, spot_tables=spots, masks=masks, out_dir=fv.out,
                        labels=labels, patch_sizes=sizes, spot_scale=fv.spot_scale,
                        outside=fv.outside_spots, validation_fraction=fv.validation_fraction,
                        mask_config=_mask_config(fv))
    return cfg.validate(), synth


# --------------------------------------------------------------------------- predict
def define_predict() -> None:
    """Flags of `bin/predict` (ISH CNN dense prediction + Dice on an independent section)."""
    if not _once("predict"):
        return
    _define_once(flags.DEFINE_string, "out", "", "Output directory.")
    flags.DEFINE_string("model_dirs", "", "ISH CNN training runs (or .keras files), one per "
                        "patch size, comma-separated; shell-style patterns allowed "
                        "(runs/ish_cnn/p*).")
    flags.DEFINE_string("section_image", "", "The section to predict (TIFF/PNG).")
    flags.DEFINE_string("spot_table", "", "Its spot table (x, y, gene): the Dice ground truth.")
    flags.DEFINE_string("section_mask", "", "Its tissue mask PNG; empty = computed.")
    _define_mask_background()
    _define_once(flags.DEFINE_float, "spot_scale", 1.0, "Spot table units -> image pixels.")
    _define_once(_define_outside_enum, "outside_spots", "error", "Spots outside the image: "
                 "error (stop, naming the row) or drop.")
    flags.DEFINE_float("truth_radius", 6.0, "Radius (px) of the discs drawn around the "
                       "section's spots as gene ground truth.", lower_bound=0.5)
    flags.DEFINE_integer("predict_stride", 4, "Pixels between window centres; 0 = each "
                         "model's native stride. Must divide or be a multiple of it (dense).",
                         lower_bound=0)
    flags.DEFINE_enum("predict_method", "dense", ["dense", "sliding"], "Fully convolutional "
                      "(shift-and-stitch for small strides) or cropped sliding windows.")
    flags.DEFINE_integer("predict_batch_size", 256, "Windows per call (sliding).",
                         lower_bound=1)
    _define_once(flags.DEFINE_bool, "report", True, "Write report.html.")


def segmentation_config(fv=FLAGS):
    """`ish_tf.families.ish_cnn.segmentation.SegmentationConfig` from the predict flags.

    Raises:
      ValueError (SegmentationError): a missing input or a pattern matching nothing.
    """
    import glob

    from ish_tf.families.ish_cnn.segmentation import SegmentationConfig, SegmentationError

    dirs: list[str] = []
    for item in parse_list(fv.model_dirs):
        if any(ch in item for ch in "*?["):
            found = sorted(glob.glob(item))
            if not found:
                raise SegmentationError(f"--model_dirs pattern {item!r} matches nothing")
            dirs.extend(found)
        else:
            dirs.append(item)
    return SegmentationConfig(
        model_dirs=tuple(dirs), image=fv.section_image, spots=fv.spot_table,
        mask=fv.section_mask, out_dir=fv.out, radius=fv.truth_radius, stride=fv.predict_stride,
        method=fv.predict_method, spot_scale=fv.spot_scale, outside=fv.outside_spots,
        batch_size=fv.predict_batch_size, seed=fv.seed, report=fv.report,
        mask_config=_mask_config(fv)).validate()

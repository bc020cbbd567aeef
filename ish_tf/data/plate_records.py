"""Record sets of fluorescence plate sites from an RxRx1 manifest (`bin/extract` on a
manifest of `bin/ingest --layout=rxrx1`), with per-plate channel stats.

Interface (stable; the mean-teacher family and its quickstart build on it)::

    summary = extract_plates(PlateExtractConfig(manifest=M, out_dir=OUT, site_size=64))

Writes into OUT:

- shards of the lossless multi-channel record kind (`ish_tf.data.records`:
  ``image/format`` "raw", `InputSpec.image(6, S, S, "uint8")`), one record per site:
  identity (``gene_symbol``) = the siRNA class as 4 digits ("0017"; "" where
  unlabelled, with ``gene_index`` -1), ``label`` = the class id (-1 unlabelled), group
  (``donor_id``) = the experiment, and the optional plate features ``plate``, ``well``,
  ``site``, ``cell_type``, ``well_type``; ``image_id`` = the manifest's; ``source_size``
  = the site's side before downsampling; ``study`` = "rxrx1";
- ``index.json`` (identity_name "sirna", group_name "experiment", split_by "donor",
  donor_splits = experiment -> split, extra["rxrx1"] = the plan) and ``genes.csv``;
- ``channel_stats.csv`` (`ish_tf.data.plate_norm`): mean and std per (experiment,
  plate, channel) over all sites of the plate as stored (every split: normalising uses
  no label);
- ``extract_flags.cfg`` (by the command).

Splits are by experiment, so validation and test hold experiments never seen in
training: the test-dataset experiments (RxRx1's test set; usually unlabelled) go to
"test"; of the labelled experiments, `validation_experiments` (default: the last
`validation_per_cell_type` of each cell type by name, while it keeps one for training)
go to "validation", `test_experiments` to "test", the rest to "train".

The shards are written with `ish_tf.data.shards` directly rather than through
`record_sets.write_record_set`, which holds every example in memory: here each site is
read from its PNGs when its shard is written (RxRx1 is 125,510 sites of 1.5 MB).

Downsampling (`site_size` > 0 and smaller than the stored site): box averaging of each
channel. Whole identities go to one shard and a shard holds each identity's records
contiguously (the P×K reader's requirement). Resumable: a shard listed in the index is
kept; its stats are kept beside it (``channel_stats.parts/``) until the table is
complete. The records written must match the plan (one per manifest row), else an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from ish_tf.data import plate_norm, rxrx1, shards
from ish_tf.data.inputs import InputSpec
from ish_tf.data.records import RecordsError
from ish_tf.io_utils import atomic_write_text

PARTS_DIR = "channel_stats.parts"
IDENTITY_NAME = "sirna"
GROUP_NAME = "experiment"


@dataclasses.dataclass(frozen=True)
class PlateExtractConfig:
    """`bin/extract` on an RxRx1 manifest.

    Attributes:
      manifest: RxRx1 manifest (`ish_tf.data.rxrx1`).
      out_dir: records folder.
      site_size: side of the stored sites (0: as stored on disk).
      num_shards: most shards per split (whole siRNAs per shard).
      compression: None or "GZIP".
      validation_experiments: labelled experiments held out for validation (empty:
        `validation_per_cell_type` per cell type).
      test_experiments: labelled experiments held out for test (besides the
        test-dataset experiments).
      validation_per_cell_type: see above.
      workers: processes writing shards (1: in this process).
      seed: stored in the index.
    """

    manifest: str
    out_dir: str
    site_size: int = 0
    num_shards: int = 4
    compression: str | None = None
    validation_experiments: tuple[str, ...] = ()
    test_experiments: tuple[str, ...] = ()
    validation_per_cell_type: int = 1
    workers: int = 1
    seed: int = 0


def assign_experiment_splits(df: pd.DataFrame, validation: Sequence[str] = (),
                             test: Sequence[str] = (), per_cell_type: int = 1) -> dict[str, str]:
    """experiment -> split (module docstring).

    Raises:
      RecordsError: a named experiment that the manifest lacks or that is unlabelled, or
        no experiment left for training.
    """
    exps = df.groupby("experiment").agg(dataset=("dataset", "first"),
                                        cell_type=("cell_type", "first"),
                                        labelled=("sirna", lambda s: s.notna().any()))
    for name, chosen in (("validation", validation), ("test", test)):
        for e in chosen:
            if e not in exps.index:
                raise RecordsError(f"--{name}_experiments names {e!r}, which the manifest "
                                   f"lacks; experiments: {', '.join(exps.index)}")
    splits: dict[str, str] = {}
    for e, row in exps.iterrows():
        if row["dataset"] == "test" or e in test:
            splits[e] = "test"
        elif e in validation:
            splits[e] = "validation"
    if not validation:
        for _, part in exps[exps.index.map(lambda e: e not in splits)].groupby("cell_type"):
            names = sorted(part.index)
            for e in names[max(1, len(names) - per_cell_type):]:
                splits[e] = "validation"
    for e in exps.index:
        splits.setdefault(e, "train")
    if "train" not in splits.values():
        raise RecordsError("no experiment left for training: every experiment is in "
                           "validation or test")
    return splits


def identity_of(sirna) -> str:
    """A record's identity from its class: 4 digits, "" where unlabelled."""
    return "" if pd.isna(sirna) else f"{int(sirna):04d}"


def downsample(site: np.ndarray, size: int) -> np.ndarray:
    """Box-averages a uint8 (H, W, C) site to (size, size, C); unchanged when size is 0
    or the site's own."""
    h, w, c = site.shape
    if not size or (h, w) == (size, size):
        return site
    if h % size == 0 and w % size == 0:
        fy, fx = h // size, w // size
        mean = site.reshape(size, fy, size, fx, c).mean(axis=(1, 3))
        return np.clip(np.round(mean), 0, 255).astype(np.uint8)
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(site[:, :, k]).resize((size, size),
                                                                     Image.BOX))
                     for k in range(c)], axis=-1)


def _plan_fingerprint(df: pd.DataFrame, splits: dict, cfg: PlateExtractConfig) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"splits": splits, "size": cfg.site_size, "shards": cfg.num_shards,
                         "compression": cfg.compression}, sort_keys=True).encode())
    h.update("\n".join(df["site_id"] + ":" + df["sirna"].astype(str)).encode())
    return h.hexdigest()[:16]


def _write_shard(task: dict) -> dict:
    """Writes one shard and its per-plate channel sums; returns its ShardInfo dict."""
    from ish_tf.data import records

    spec = InputSpec.from_dict(task["spec"])
    sums: dict[tuple[str, int], dict] = {}
    with shards.ShardWriter(task["out_dir"], task["split"], task["index"], task["num_shards"],
                            task["compression"]) as writer:
        for row in task["rows"]:
            try:
                site = rxrx1.load_site(row["paths"])
            except rxrx1.Rxrx1Error as e:
                raise RecordsError(f"{task['manifest']}: site {row['site_id']} (image_id "
                                   f"{row['image_id']}): {e}") from e
            source = site.shape[0]
            site = downsample(site, spec.height)
            if site.shape[:2] != (spec.height, spec.width):
                raise RecordsError(f"{task['manifest']}: site {row['site_id']} is "
                                   f"{site.shape[0]}x{site.shape[1]} pixels; the set's sites "
                                   f"are {spec.height}x{spec.width} (give --site_size)")
            serialized = records.make_example(
                input_spec=spec, image=site, image_id=row["image_id"],
                gene_symbol=row["identity"], gene_index=row["identity_index"],
                donor_id=row["experiment"], donor_index=row["group_index"],
                label=row["label"], source_size=source, study="rxrx1",
                plate=row["plate"], well=row["well"], site=row["site"],
                cell_type=row["cell_type"], well_type=row["well_type"])
            writer.write(serialized, row["identity"], row["image_id"])
            pixels = site.reshape(-1, site.shape[-1]).astype(np.float64)
            s = sums.setdefault((row["experiment"], row["plate"]), {
                "sum": np.zeros(site.shape[-1]), "sumsq": np.zeros(site.shape[-1]),
                "n_pixels": 0, "n_sites": 0})
            s["sum"] += pixels.sum(0)
            s["sumsq"] += (pixels**2).sum(0)
            s["n_pixels"] += pixels.shape[0]
            s["n_sites"] += 1
    # Exact sums (not means) per shard, so that shards written apart combine exactly.
    raw = pd.DataFrame([{"experiment": e, "plate": p, "channel": c + 1, "sum": s["sum"][c],
                         "sumsq": s["sumsq"][c], "n_pixels": s["n_pixels"],
                         "n_sites": s["n_sites"]}
                        for (e, p), s in sorted(sums.items()) for c in range(len(s["sum"]))])
    parts_dir = os.path.join(task["out_dir"], PARTS_DIR)
    os.makedirs(parts_dir, exist_ok=True)
    atomic_write_text(os.path.join(parts_dir, os.path.basename(writer.path) + ".csv"),
                      raw.to_csv(index=False, float_format="%.17g"))
    return dataclasses.asdict(writer.info)


def _combine_parts(out_dir: str, files: Sequence[str]) -> pd.DataFrame:
    frames = []
    for f in files:
        path = os.path.join(out_dir, PARTS_DIR, os.path.basename(f) + ".csv")
        if not os.path.exists(path):
            raise RecordsError(f"{path}: the channel sums of shard {f} are missing; remove "
                               f"{f} from {out_dir} and rerun to rewrite it")
        frames.append(pd.read_csv(path, dtype={"experiment": str}))
    raw = pd.concat(frames, ignore_index=True)
    sums = {}
    for (e, p), part in raw.groupby(["experiment", "plate"]):
        part = part.groupby("channel").sum(numeric_only=True).sort_index()
        sums[(e, int(p))] = {"sum": part["sum"].to_numpy(), "sumsq": part["sumsq"].to_numpy(),
                             "n_pixels": int(part["n_pixels"].iloc[0]),
                             "n_sites": int(part["n_sites"].iloc[0])}
    return plate_norm.stats_table(sums)


def extract_plates(cfg: PlateExtractConfig, progress: bool = False) -> dict:
    """Writes the record set and the stats table (module docstring).

    Returns:
      Summary: records per split, experiments per split, classes, site size, paths.

    Raises:
      RecordsError / rxrx1.Rxrx1Error: a bad manifest, an undecodable image (naming the
        file and the site), sites of mixed sizes without `site_size`, an out_dir
        holding another plan, or counts that do not match the plan.
    """
    df = rxrx1.read_manifest(cfg.manifest)
    if not len(df):
        raise RecordsError(f"{cfg.manifest}: no sites")
    sizes = set(zip(df["height"], df["width"], strict=True))
    if not cfg.site_size and len(sizes) > 1:
        raise RecordsError(f"{cfg.manifest}: sites of several sizes {sorted(sizes)[:4]}; give "
                           "--site_size to store them at one size")
    height = cfg.site_size or int(df["height"].iloc[0])
    width = cfg.site_size or int(df["width"].iloc[0])
    if cfg.site_size and any(h < cfg.site_size or w < cfg.site_size for h, w in sizes):
        raise RecordsError(f"--site_size={cfg.site_size} is larger than sites of "
                           f"{min(sizes)} pixels; downsampling only")
    splits = assign_experiment_splits(df, cfg.validation_experiments, cfg.test_experiments,
                                      cfg.validation_per_cell_type)
    spec = InputSpec.image(rxrx1.N_CHANNELS, height, width, "uint8")
    df = df.assign(split=df["experiment"].map(splits),
                   identity=[identity_of(s) for s in df["sirna"]],
                   label=[-1 if pd.isna(s) else int(s) for s in df["sirna"]])
    vocabulary = sorted(i for i in df["identity"].unique() if i)
    identity_index = {g: k for k, g in enumerate(vocabulary)}
    identity_index[""] = -1
    groups = sorted(df["experiment"].unique())
    group_index = {g: k for k, g in enumerate(groups)}
    fingerprint = _plan_fingerprint(df, splits, cfg)

    index = shards.load_index(cfg.out_dir, missing_ok=True)
    if index["dataset"] is not None:
        old = (index["dataset"].get("extra") or {}).get("rxrx1", {}).get("plan")
        if old != fingerprint:
            raise RecordsError(f"{cfg.out_dir}: already holds a record set of another plan "
                               "(manifest, splits, site size or shards differ); write to a "
                               "fresh --out")
    genes = [shards.GeneEntry(g, identity_index[g], -1, "") for g in vocabulary]
    n_classes = int(df["label"].max()) + 1
    info = shards.DatasetInfo(
        genes=genes, donors=groups, source_size=int(df["height"].max()), patch_size=height,
        format="raw", seed=cfg.seed, split_by="donor", donor_splits=splits,
        extra={"rxrx1": {"plan": fingerprint, "manifest": os.path.abspath(cfg.manifest),
                         "n_classes": n_classes, "site_size": height,
                         "stats": plate_norm.STATS_NAME,
                         "experiments": {s: sorted(e for e, v in splits.items() if v == s)
                                         for s in shards.SPLITS}}},
        input_spec=spec.to_dict(), identity_name=IDENTITY_NAME, group_name=GROUP_NAME)
    os.makedirs(cfg.out_dir, exist_ok=True)
    shards.write_dataset_info(cfg.out_dir, info)

    paths = rxrx1.channel_paths(df, cfg.manifest)
    done = {s["file"] for s in shards.load_index(cfg.out_dir)["shards"]}
    tasks, planned = [], {}
    for split in shards.SPLITS:
        part = df[df["split"] == split]
        if not len(part):
            continue
        identities = sorted(part["identity"].unique())
        k = min(cfg.num_shards, len(identities))
        shard_of = shards.assign_shards(identities, k)
        part = part.assign(row_pos=part.index).sort_values(["identity", "image_id"])
        planned[split] = len(part)
        for s in range(k):
            name = shards.shard_name(split, s, k, cfg.compression)
            planned.setdefault("_files", []).append(name)
            if name in done:
                continue
            rows = [{"image_id": int(r.image_id), "site_id": r.site_id, "identity": r.identity,
                     "identity_index": identity_index[r.identity], "experiment": r.experiment,
                     "group_index": group_index[r.experiment], "label": int(r.label),
                     "plate": int(r.plate), "well": r.well, "site": int(r.site),
                     "cell_type": r.cell_type, "well_type": r.well_type,
                     "paths": list(paths[r.row_pos])}
                    for r in part.itertuples() if shard_of[r.identity] == s]
            tasks.append({"out_dir": cfg.out_dir, "split": split, "index": s, "num_shards": k,
                          "compression": cfg.compression, "spec": spec.to_dict(),
                          "rows": rows, "manifest": cfg.manifest})
    if cfg.workers > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(cfg.workers, len(tasks)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            for shard_info in pool.map(_write_shard, tasks):
                shards.update_index(cfg.out_dir, shards.ShardInfo(**shard_info))
                if progress:
                    print(f"extract: {shard_info['file']} written", flush=True)
    else:
        for task in tasks:
            shard_info = _write_shard(task)
            shards.update_index(cfg.out_dir, shards.ShardInfo(**shard_info))
            if progress:
                print(f"extract: {shard_info['file']} written", flush=True)

    index = shards.load_index(cfg.out_dir)
    written = {s["file"]: s for s in index["shards"]}
    counts = {}
    for split in shards.SPLITS:
        counts[split] = sum(s["num_records"] for s in written.values() if s["split"] == split)
        if counts[split] != planned.get(split, 0):
            raise RecordsError(f"{cfg.out_dir}: split {split} holds {counts[split]} records but "
                               f"the manifest plans {planned.get(split, 0)}")
    stats = _combine_parts(cfg.out_dir, planned["_files"])
    if int(stats.groupby(["experiment", "plate"])["n_sites"].first().sum()) != len(df):
        raise RecordsError(f"{cfg.out_dir}: the channel stats cover "
                           f"{int(stats['n_sites'].sum() / rxrx1.N_CHANNELS)} sites, the "
                           f"manifest {len(df)}")
    stats_path = os.path.join(cfg.out_dir, plate_norm.STATS_NAME)
    plate_norm.write_channel_stats(stats_path, stats)
    labelled = df[df["label"] >= 0]
    return {"records": counts, "experiments": info.extra["rxrx1"]["experiments"],
            "classes": int(labelled["label"].nunique()), "n_classes": n_classes,
            "unlabelled": int((df["label"] < 0).sum()), "site_size": height,
            "source_size": int(df["height"].max()), "stats": stats_path,
            "records_dir": cfg.out_dir}


def format_summary(summary: dict) -> str:
    """Lines for the command's output."""
    r, e = summary["records"], summary["experiments"]
    lines = [f"extract: {sum(r.values())} sites ({summary['site_size']}x{summary['site_size']}x6 "
             f"uint8, raw; from {summary['source_size']} px) of {summary['classes']} siRNA "
             f"classes, {summary['unlabelled']} unlabelled"]
    for split in shards.SPLITS:
        if r.get(split):
            lines.append(f"  {split:<10} {r[split]:>6} sites, experiments {', '.join(e[split])}")
    lines.append(f"  records:  {os.path.abspath(summary['records_dir'])}")
    lines.append(f"  stats:    {os.path.abspath(summary['stats'])} (per experiment, plate, "
                 "channel)")
    return "\n".join(lines)

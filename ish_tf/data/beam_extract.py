"""Patch extraction on Apache Beam (`bin/extract --runner=beam`): the same shards, at scale.

The plan is the local runner's (`patches.plan_extraction`: splits, whole genes per shard,
shard names); the pipeline is::

    planned images -> Reshuffle -> extract (decode, mask, sample, crop, encode; one
    image per element, on any worker; its records staged in a file of their own) -> key
    by shard -> GroupByKey (small summaries, no patch bytes) -> write the shard (images
    in plan order, copied from their staged files, so the bytes equal the local runner's)

Each shard is written by one `ShardWriter` into a staging directory under a unique name,
read back and counted, and moved into place only if the records read back equal the
records written and the patches the extraction produced for the shard's planned images
(all of them, no more). Any difference raises `ShardCountError` naming the shard: a lost
record is never silent, whatever the runner (the multi-threaded direct runner was seen to
drop large records without an error; it is refused). The driver then checks again: it
reads every new shard's record count from disk, compares it with what the pipeline
reported for it, and only then marks shards complete in `OUT/index.json` and
`extract_report.csv`, in plan order. A run killed anywhere leaves at most staged files
and shards not in the index; a rerun removes the staging and redoes those shards.

Runners: without a `--runner` in the Beam options, pipelines run on Beam's
`FnApiRunner` explicitly (in-process for one worker, `multi_processing` with
`direct_num_workers` for more), never the `DirectRunner` default (since Beam 2.68 it
downloads the Prism binary at run time) and never `multi_threading`. Any other runner
(`--runner=DataflowRunner --project=... --temp_location=gs://...`, `FlinkRunner`,
`SparkRunner`) is passed through; its workers need `ish_tf` installed (e.g.
`--setup_file=./setup.py`) and OUT, the manifest and the images on storage they and the
driver share: a shared mount, or a URL of any filesystem `tf.io.gfile` supports
(`gs://bucket/out`; every file operation of the pipeline goes through `ish_tf.fs`).

On object stores a rename is a copy and a delete, not atomic. The guarantee "nothing
partial taken for complete" does not rest on it: a shard counts only once the driver
finds its result file (`OUT/.beam_results/<shard>.json`), which the writer writes after
the shard and its offsets are in place, and the driver reads the shard's record count
back before it lists the shard in `index.json`; a rerun removes the staging and the
results of an interrupted run and redoes every shard the index does not list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import uuid
from collections.abc import Sequence
from typing import Any

import pandas as pd
from absl import logging

from ish_tf import fs
from ish_tf.data import patches as P
from ish_tf.data.patch_sampling import UNREADABLE, ImageResult

STAGING = ".beam_staging"  # OUT/.beam_staging/<shard>/<attempt>/: shards before their checks
RESULTS = ".beam_results"  # OUT/.beam_results/<shard>.json: what the pipeline wrote


class ShardCountError(P.ExtractError):
    """A shard whose written or read-back record count differs from the plan."""


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """One planned image: its shard, its position there, and its manifest fields."""

    split: str
    shard: int
    num_shards: int
    position: int
    path: str
    image_id: int
    gene_symbol: str
    donor_id: str
    region: str
    study: str
    width: int
    height: int
    um_per_pixel: float | None = None  # for --source_um (`patches.image_config`)
    read_downsample: int = 1


def shard_key(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def quiet_beam_logs() -> None:
    """Beam's own INFO lines (job service, worker hand-offs) are not progress: WARNING up."""
    import logging as py_logging

    beam_logger = py_logging.getLogger("apache_beam")
    beam_logger.setLevel(max(py_logging.WARNING, beam_logger.getEffectiveLevel()))


def pipeline_options(beam_options: str | Sequence[str] = (), workers: int = 1):
    """(runner, PipelineOptions) from `--beam_options` text (or a list of flags).

    Without `--runner`, Beam's `FnApiRunner`: in-process (`in_memory`) for one worker,
    `multi_processing` with `direct_num_workers` for more. `--runner=DirectRunner` means
    the same (not the Prism download). `multi_threading` is refused.

    Raises:
      ExtractError: an unparsable option string or `direct_running_mode=multi_threading`.
    """
    from apache_beam.options.pipeline_options import (
        DirectOptions,
        PipelineOptions,
        StandardOptions,
        WorkerOptions,
    )

    try:
        flags = shlex.split(beam_options) if isinstance(beam_options, str) else list(beam_options)
    except ValueError as e:
        raise P.ExtractError(f"--beam_options={beam_options!r}: {e}") from None
    options = PipelineOptions(flags)
    direct = options.view_as(DirectOptions)
    if direct.direct_running_mode == "multi_threading":
        raise P.ExtractError(
            "--beam_options: direct_running_mode=multi_threading is refused (with large "
            "records it was seen to drop records without an error); use in_memory or "
            "multi_processing")
    runner = options.view_as(StandardOptions).runner
    if runner in (None, "DirectRunner", "FnApiRunner", "BundleBasedDirectRunner"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        if "--direct_num_workers" not in " ".join(flags):
            direct.direct_num_workers = workers
        if "--default_sdk_harness_log_level" not in " ".join(flags):
            # Quiet by default: the SDK workers' INFO lines would flood the terminal.
            options.view_as(WorkerOptions).default_sdk_harness_log_level = "WARNING"
        if "--direct_running_mode" not in " ".join(flags):
            direct.direct_running_mode = ("multi_processing" if direct.direct_num_workers > 1
                                          else "in_memory")
        return FnApiRunner(), options
    return runner, options


# --------------------------------------------------------------------------- pipeline steps
def extract_task(task: ImageTask, cfg: P.ExtractConfig, info: Any, out: str, mask_dir: str,
                 overlay_dir: str | None) -> tuple[str, dict]:
    """Extracts one image into a staged file of its records; returns (shard key, where the
    records are, how many, the report row).

    Only this small summary goes through the GroupByKey: the patch bytes stay in
    `OUT/.beam_staging/images/` until the shard's writer copies them in plan order, so
    neither the runner's shuffle nor a writer holds a shard's patches.
    """
    import tensorflow as tf

    from ish_tf.data import records

    own = P.image_config(cfg, task)  # the image's window (--source_um) and reading level
    res: ImageResult = P._extract_task((task.path, task.image_id, own, mask_dir, overlay_dir))
    n = own.read_downsample  # records give windows in the stored file's pixels
    gene = task.gene_symbol
    entrez = {g.gene_symbol: g.entrez_id for g in info.genes}
    common = dict(image_id=task.image_id, gene_symbol=gene, gene_index=info.gene_index()[gene],
                  entrez_id=entrez.get(gene, -1), donor_id=task.donor_id,
                  donor_index=info.donors.index(task.donor_id), region=task.region,
                  study=task.study)
    examples = [records.make_example(
        image_encoded=p.encoded, patch_index=k, x=p.x * n, y=p.y * n,
        source_size=own.source_size * n,
        image_format=cfg.image_format, image_height=cfg.patch_size,
        image_width=cfg.patch_size, **common) for k, p in enumerate(res.patches)]
    row = {"image_id": task.image_id, "gene_symbol": gene, "donor_id": task.donor_id,
           "split": task.split, "shard": task.shard, "status": res.status,
           "n_patches": res.n_patches, "tissue_fraction": round(res.tissue_fraction, 4),
           "reason": res.reason}
    note = P.size_mismatch(task, res)
    if note:
        row["reason"] = f"{row['reason']}; {note}" if row["reason"] else note
    path = None
    if examples:
        staging = fs.join(out, STAGING, "images")
        fs.makedirs(staging)
        # Unique per attempt: a retried or speculative attempt never overwrites another's.
        path = fs.join(staging, f"{task.image_id}.{uuid.uuid4().hex}.tfrecord")
        with tf.io.TFRecordWriter(path) as w:
            for ex in examples:
                w.write(ex)
    return shard_key(task.split, task.shard), {
        "position": task.position, "image_id": task.image_id, "gene": gene,
        "records": path, "n": len(examples), "row": row, "readable": res.status != UNREADABLE}


def _write_record(writer: Any, serialized: bytes, gene: str, image_id: int) -> None:
    """One record into the shard (a seam for the fault-injection test)."""
    writer.write(serialized, gene, image_id)


def count_records(path: str, compression: str | None) -> int:
    """Records in a written shard, read back from the file.

    Raises:
      ShardCountError: a partial record at the end (truncated shard).
    """
    if compression is None:
        from ish_tf.data.framing import count_complete_records

        n, partial = count_complete_records(path)
        if partial:
            raise ShardCountError(f"{path}: ends in a partial record after {n} records")
        return n
    import tensorflow as tf

    return sum(1 for _ in tf.data.TFRecordDataset(path, compression_type=compression))


def write_shard(item: tuple[str, Any], out: str, compression: str | None,
                planned: dict[str, list[int]], num_shards: dict[str, int]) -> dict:
    """Writes one shard from its images' results; checks the counts; moves it into place.

    Returns:
      What was written: {"key", "info" (ShardInfo dict), "rows", "readable", "expected"}.

    Raises:
      ShardCountError: an image of the plan missing or repeated, or the records written,
        read back and produced differ; the shard is not moved into place.
    """
    from ish_tf.data import framing, shards

    key, results = item
    results = sorted(results, key=lambda r: r["position"])
    split, index = key.rsplit("-", 1)
    index = int(index)
    name = shards.shard_name(split, index, num_shards[key], compression)
    got_ids = [r["image_id"] for r in results]
    if got_ids != planned[key]:
        missing = sorted(set(planned[key]) - set(got_ids))
        extra = len(got_ids) - len(set(got_ids))
        raise ShardCountError(
            f"shard count mismatch: {name}: the pipeline delivered {len(got_ids)} of the "
            f"{len(planned[key])} planned images (missing image_id {missing[:5]}, "
            f"{extra} repeated); the shard was not written")
    import tensorflow as tf

    expected = sum(r["n"] for r in results)
    staging = fs.join(out, STAGING, key, uuid.uuid4().hex)  # unique per attempt
    try:
        with shards.ShardWriter(staging, split, index, num_shards[key], compression) as w:
            for r in results:
                if not r["n"]:
                    continue
                n = 0
                for ex in tf.compat.v1.io.tf_record_iterator(r["records"]):
                    _write_record(w, ex, r["gene"], r["image_id"])
                    n += 1
                if n != r["n"]:
                    raise ShardCountError(
                        f"shard count mismatch: {name}: image {r['image_id']} produced "
                        f"{r['n']} patches, its staged file {r['records']} holds {n}; the "
                        "shard was not written (rerun to redo it)")
        staged = fs.join(staging, name)
        held = count_records(staged, compression)
        if not expected == w.info.num_records == held:
            raise ShardCountError(
                f"shard count mismatch: {name}: the plan's images produced {expected} "
                f"patches, the writer wrote {w.info.num_records}, the file holds {held}; "
                "the shard was not written (rerun to redo it)")
        final = fs.join(out, name)
        if compression is None:  # the offsets sidecar first, as ShardWriter does
            fs.replace(framing.offsets_path(staged), framing.offsets_path(final))
        fs.replace(staged, final)
    finally:
        fs.rmtree(staging, ignore_errors=True)
    result = {"key": key, "info": w.info.to_dict(),
              "rows": [r["row"] for r in results],
              "readable": any(r["readable"] for r in results), "expected": expected,
              "first_reason": next((r["row"]["reason"] for r in results
                                    if not r["readable"]), "")}
    from ish_tf.io_utils import atomic_write_text

    # The completion marker, written only now that the shard and its sidecar are in
    # place: on object stores the renames above are copies and deletes, not atomic, so a
    # shard file's presence proves nothing; this file (checked again by the driver
    # against the shard's record count) is what says the shard is complete.
    atomic_write_text(fs.join(out, RESULTS, f"{key}.json"), json.dumps(result))
    for r in results:  # the shard is in place: its images' staged records are done with
        if r["records"]:
            fs.remove(r["records"])
    return result


# --------------------------------------------------------------------------- the stage
def _tasks(manifest: str, plans: list[P.ShardPlan]) -> list[ImageTask]:
    from ish_tf.data import manifest as mf

    tasks = []
    for plan in plans:
        for pos, r in enumerate(plan.rows.itertuples(index=False)):
            tasks.append(ImageTask(
                split=plan.split, shard=plan.index, num_shards=plan.num_shards, position=pos,
                path=mf.image_path(manifest, str(r.path)), image_id=int(r.image_id),
                gene_symbol=str(r.gene_symbol), donor_id=str(r.donor_id),
                region=P._text(r.region), study=P._text(r.study),
                width=int(getattr(r, "width", 0) or 0), height=int(getattr(r, "height", 0) or 0),
                um_per_pixel=_float_or_none(getattr(r, "um_per_pixel", None)),
                read_downsample=P._row_int(r, "read_downsample", 1)))
    return tasks


def _float_or_none(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _pipeline_error(e: Exception) -> P.ExtractError:
    """The first line of ours in a runner's wrapped exception, else the exception."""
    text = str(e)
    for marker in ("shard count mismatch: ", "ExtractError: "):
        if marker in text:
            line = text[text.index(marker):].splitlines()[0]
            line = line.removeprefix("ExtractError: ")
            return (ShardCountError if marker.startswith("shard") else P.ExtractError)(line)
    return P.ExtractError(f"the Beam pipeline failed: {type(e).__name__}: {text[:2000]}")


def run_extract_beam(cfg: P.ExtractConfig, beam_options: str | Sequence[str] = (),
                     progress_enabled: bool | None = None) -> dict:
    """`patches.run_extract` as an Apache Beam pipeline: the same shards, index and report.

    Args:
      cfg: extraction settings (`cfg.workers` = direct_num_workers of the local runner).
      beam_options: Beam pipeline options, as `--beam_options` text or a list of flags.
      progress_enabled: unused (Beam reports its own progress); kept for symmetry.

    Returns:
      `patches.run_extract`'s summary dict.

    Raises:
      ExtractError: as `run_extract`; `ShardCountError` naming a shard whose records
        were lost or added between extraction, writing and reading back.
    """
    del progress_enabled
    with P.exclusive_out_dir(cfg.out_dir):
        return _run(cfg, beam_options)


def import_beam():
    """apache_beam, or a clear error naming the extra to install."""
    try:
        import apache_beam as beam
    except ImportError as e:
        raise P.ExtractError(f"--runner=beam needs Apache Beam ({e}): pip install -e .[beam] "
                             "(apache-beam[tfrecord])") from None
    return beam


def _run(cfg: P.ExtractConfig, beam_options: str | Sequence[str]) -> dict:
    beam = import_beam()

    from ish_tf.data import shards

    runner, options = pipeline_options(beam_options, cfg.workers)
    df = P.select_images(cfg)
    P.check_scale(df, cfg)
    P.check_background(df, cfg)
    out = cfg.out_dir
    mask_dir = fs.join(out, "masks")
    overlay_dir = fs.join(out, "overlays") if cfg.save_overlays else None
    info, plans, _ = P.plan_extraction(df, cfg, P.plan_assignment(df, cfg, mask_dir))
    removed = P.prepare_out_dir(out, info, mask_dir, overlay_dir)
    for leftover in (STAGING, RESULTS):  # an interrupted run's: never taken for complete
        path = fs.join(out, leftover)
        if fs.exists(path):
            removed.append(path)
            fs.rmtree(path)
    fs.makedirs(fs.join(out, RESULTS))
    report_path = fs.join(out, P.REPORT_NAME)
    report = P._read_report(report_path)
    done = {split: shards.completed_shards(out, split) for split in shards.SPLITS}
    pending = [p for p in plans if p.index not in done[p.split]]
    resumed = len(plans) - len(pending)
    P._check_image_dirs(cfg.manifest, pending)
    if resumed:
        logging.info("resuming: %d of %d shard(s) already complete", resumed, len(plans))
    tasks = _tasks(cfg.manifest, pending)
    planned = {shard_key(p.split, p.index): [int(i) for i in p.rows["image_id"]]
               for p in pending}
    num_shards = {shard_key(p.split, p.index): p.num_shards for p in pending}
    compression = cfg.compression
    if tasks:
        quiet_beam_logs()
        try:
            with beam.Pipeline(runner=runner, options=options) as pipeline:
                _ = (pipeline
                     | "PlannedImages" >> beam.Create(tasks, reshuffle=False)
                     | "Reshuffle" >> beam.Reshuffle()
                     | "Extract" >> beam.Map(extract_task, cfg, info, out, mask_dir,
                                             overlay_dir)
                     | "ByShard" >> beam.GroupByKey()
                     | "WriteShard" >> beam.Map(write_shard, out, compression, planned,
                                                num_shards))
        except P.ExtractError:
            raise
        except Exception as e:  # runners wrap the workers' exceptions
            raise _pipeline_error(e) from e
    written = _finish(out, cfg.manifest, plans, pending, resumed, report, report_path,
                      compression)
    for leftover in (STAGING, RESULTS):
        fs.rmtree(fs.join(out, leftover), ignore_errors=True)
    summary = P.extract_summary(out, report, plans, removed, written, resumed, report_path)
    return P.check_outcome(summary, report, df, cfg)


def _finish(out: str, manifest: str, plans: list[P.ShardPlan], pending: list[P.ShardPlan],
            resumed: int,
            report: dict, report_path: str, compression: str | None) -> int:
    """Checks every new shard on disk against the pipeline's account, then marks them
    complete in plan order (held back, as locally, while no image of the run was readable).

    Raises:
      ShardCountError: a planned shard missing, or its file's count differs.
      ExtractError: every image of the run was unreadable.
    """
    from ish_tf.data import framing, shards

    results = []
    for plan in pending:
        key = shard_key(plan.split, plan.index)
        path = fs.join(out, RESULTS, f"{key}.json")
        name = shards.shard_name(plan.split, plan.index, plan.num_shards, compression)
        if not fs.exists(path):
            raise ShardCountError(f"shard count mismatch: {name}: the pipeline finished "
                                  "without writing it; rerun to redo it")
        with fs.open(path, encoding="utf-8") as f:
            result = json.load(f)
        held = count_records(fs.join(out, name), compression)
        if held != result["info"]["num_records"] or held != result["expected"]:
            raise ShardCountError(
                f"shard count mismatch: {name}: the pipeline wrote "
                f"{result['info']['num_records']} records (planned {result['expected']}), "
                f"the file holds {held}; rerun to redo it")
        results.append(result)
    if not resumed and results and not any(r["readable"] for r in results):
        for plan in pending:
            name = shards.shard_name(plan.split, plan.index, plan.num_shards, compression)
            for p in (fs.join(out, name), framing.offsets_path(fs.join(out, name))):
                with contextlib.suppress(OSError):
                    fs.remove(p)
        n = sum(len(r["rows"]) for r in results)
        raise P.ExtractError(
            f"every one of the {n} image(s) of {manifest} was unreadable (first: "
            f"{results[0]['first_reason']}); no shard was marked complete: check the images "
            "and rerun")
    for result in results:
        report.update({int(r["image_id"]): r for r in result["rows"]})
        P._write_report(report_path, report)
        shards.update_index(out, shards.ShardInfo.from_dict(result["info"]))
    # As locally: rows of images no longer planned (another --genes) leave the report.
    planned = {int(i) for p in plans for i in p.rows["image_id"]}
    for k in [k for k in report if k not in planned]:
        del report[k]
    P._write_report(report_path, report)
    return len(results)

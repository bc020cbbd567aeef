"""`bin/embed --runner=beam`: the SavedModel over the shards as an Apache Beam pipeline.

The unit of work is the shard, as in the local path's resume: a pipeline of the shards
without a valid part (`OUT/.parts/<shard>.npz`) -> Reshuffle -> a DoFn that loads the
SavedModel once per worker (`setup`) and embeds one shard in batches (`embed.embed_shard`:
the same batching, per-record fallback, count check against index.json and
`--skip_corrupt` accounting) -> the shard's part, written atomically on shared storage.
The driver then reads the parts back and writes the tables exactly as the local path does
(`embed.embed_records`, which finds every part present), so both runners write the same
patch, image, donor and gene tables (CSV or Parquet).

Parallelism is one shard per worker at a time: extract with `--num_shards` at least the
number of workers. Runners as for extraction (`ish_tf.data.beam_extract.pipeline_options`):
Beam's FnApiRunner here by default, `--beam_options` for Dataflow, Flink or Spark (workers
need ish_tf, TensorFlow and OUT and the records on storage they share with the driver: a
shared mount, or a URL of any filesystem `tf.io.gfile` supports, e.g. `gs://bucket/...`,
through `ish_tf.fs`; the SavedModel's path is TensorFlow's to open).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence

from ish_tf import embed as E
from ish_tf import fs


def _dofn(config: E.EmbedConfig):
    """The DoFn: one shard in, its part written; the model loaded once per worker (built
    here so that this module imports without Beam)."""
    import apache_beam as beam

    class _EmbedShard(beam.DoFn):
        def setup(self):
            self.served = E.ServedModel(config.saved_model, config.signature, config.output,
                                        allow_foreign=config.allow_foreign_saved_model)

        def process(self, shard: dict):
            path = fs.join(config.records_dir, shard["file"])
            stamp = E.shard_stamp(path)
            expected = shard.get("num_records")
            start = time.perf_counter()
            keys, values, skipped = E.embed_shard(
                self.served, path, shard["split"], config.batch_size,
                expected=None if expected is None else int(expected),
                skip_corrupt=config.skip_corrupt)
            seconds = time.perf_counter() - start
            E.save_part(E.part_path(config.out_dir, shard["file"]), self.served.model_id,
                        stamp, keys, values, skipped)
            yield {"file": shard["file"], "patches": len(keys), "seconds": seconds}

    return _EmbedShard()


def _pipeline_error(e: Exception) -> E.EmbedError:
    text = str(e)
    for marker in ("ShardReadError: ", "EmbedError: "):
        if marker in text:
            return E.EmbedError(text[text.index(marker) + len(marker):].splitlines()[0])
    return E.EmbedError(f"the Beam pipeline failed: {type(e).__name__}: {text[:2000]}")


def embed_records_beam(config: E.EmbedConfig, beam_options: str | Sequence[str] = (),
                       *, progress: bool | None = None) -> E.EmbedResult:
    """`embed.embed_records` with the shards embedded by a Beam pipeline.

    Args:
      config: see `embed.EmbedConfig`.
      beam_options: Beam pipeline options (`--beam_options` text or a list of flags).
      progress: passed to the table-writing step.

    Returns:
      The `EmbedResult` (patches_embedded, seconds and shards_reused count the pipeline's
      work: seconds is the wall time of the pipeline, start-up included).

    Raises:
      EmbedError: as `embed_records`; a shard's error (a corrupt or short shard) names it.
    """
    from ish_tf.data.beam_extract import import_beam, pipeline_options, quiet_beam_logs

    try:
        beam = import_beam()
    except ValueError as e:
        raise E.EmbedError(str(e)) from None
    config.validate()
    shards = E.selected_shards(config.records_dir, config.splits)
    served = E.ServedModel(config.saved_model, config.signature, config.output,
                           allow_foreign=config.allow_foreign_saved_model)
    fs.makedirs(fs.join(config.out_dir, E.PARTS_DIR))
    pending = [s for s in shards if E.load_part(
        E.part_path(config.out_dir, s["file"]), served.model_id,
        E.shard_stamp(fs.join(config.records_dir, s["file"]))) is None]
    del served  # the workers load their own
    try:
        runner, options = pipeline_options(beam_options, 1)
    except ValueError as e:
        raise E.EmbedError(str(e)) from None
    start = time.perf_counter()
    if pending:
        quiet_beam_logs()
        try:
            with beam.Pipeline(runner=runner, options=options) as pipeline:
                _ = (pipeline
                     | "Shards" >> beam.Create(pending, reshuffle=False)
                     | "Reshuffle" >> beam.Reshuffle()
                     | "Embed" >> beam.ParDo(_dofn(config)))
        except E.EmbedError:
            raise
        except Exception as e:  # runners wrap the workers' exceptions
            raise _pipeline_error(e) from e
    seconds = time.perf_counter() - start
    result = E.embed_records(config, progress=progress)  # every part present: tables only
    embedded = _patches_in(config, pending) if pending else 0
    result = dataclasses.replace(
        result, shards_reused=len(shards) - len(pending), patches_embedded=embedded,
        seconds=seconds, patches_per_sec=embedded / seconds if seconds > 0 else 0.0)
    path = fs.join(config.out_dir, E.SUMMARY_NAME)
    with fs.open(path, encoding="utf-8") as f:
        summary = json.load(f)
    summary.update({k: getattr(result, k) for k in ("shards_reused", "patches_embedded",
                                                    "seconds", "patches_per_sec")})
    summary["runner"] = "beam"
    from ish_tf.io_utils import atomic_write_text

    atomic_write_text(path, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return result


def _patches_in(config: E.EmbedConfig, shards: list[dict]) -> int:
    """Records embedded from `shards` (their index counts less the skipped and lost)."""
    import pandas as pd

    skipped = pd.read_csv(fs.readable(fs.join(config.out_dir, E.SKIPPED_NAME)))
    files = {s["file"] for s in shards}
    bad = int(skipped.loc[skipped["shard"].isin(files), "n_records"].sum()) if len(skipped) else 0
    return sum(int(s.get("num_records", 0)) for s in shards) - bad

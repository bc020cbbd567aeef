"""`bin/fetch`: download Allen Brain Atlas ISH section images and write their manifest.

Example:
  bin/fetch --study=cortex --out=data/allen/cortex --genes=PVALB,SST --max_images=20
  bin/fetch --flagfile=configs/fetch_cortex.cfg

Writes OUT/images/{image_id}.jpg, OUT/manifest.csv, OUT/failures.csv and
OUT/fetch_flags.cfg (the resolved flags). Rerunning the same command resumes: complete
images are kept, missing or failed ones are downloaded.
"""

from __future__ import annotations

import os
import sys

from ish_tf import config
from ish_tf.cli import define_common, definer, run, usage_errors

NAME = "fetch"
USES_TENSORFLOW = False


def define_fetch(fv) -> None:
    """Flags of `bin/fetch` (Allen Brain Atlas section images -> images/, manifest.csv)."""
    d = definer(fv, NAME)
    d.enum("study", "cortex", ["cortex", "schizophrenia", "mouse"],
           "Allen ISH product: cortex (Human Cortex Study, product 9), schizophrenia (Human "
           "Schizophrenia Study, 11), mouse (adult Mouse, 1).")
    d.string("api_url", "http://api.brain-map.org", "Allen API host (scheme://host[:port]).")
    d.string("out", "", "Output directory: images/, manifest.csv, failures.csv.")
    d.string("genes", "", "Comma-separated gene acronyms to fetch, or @FILE with one per "
             "line; empty fetches every gene of the study.")
    d.integer("max_images", 0, "Keep only the first N images (experiment id, image id "
              "order); 0 = all.", lower_bound=0)
    d.integer("sections_per_experiment", 0, "Keep only the N section images of each "
              "experiment nearest the middle of its series (by section_number); 0 = all (an "
              "adult mouse series has ~20).", lower_bound=0)
    d.integer("downsample", 2, "image_download downsample: each side halved N times.",
              lower_bound=0)
    d.integer("workers", 4, "Concurrent image downloads.", lower_bound=1)
    d.string("plane", "", "plane_of_section to keep (coronal, sagittal); empty = the study's "
             "default (mouse: sagittal, human: all); 'any' = all.")
    d.integer("page_size", 50, "Rows per RMA query page (1..2000).", lower_bound=1)
    d.integer("retries", 5, "Retries of a request after timeouts, 5xx, 429, cut-off or "
              "undecodable bodies.", lower_bound=0)
    d.float("backoff_base", 1.0, "First retry delay in seconds; doubles each retry.",
            lower_bound=0.0)
    d.float("max_retry_after", 60.0, "Cap on a server's Retry-After, seconds.", lower_bound=0.0)
    d.float("timeout", 60.0, "Connect/read timeout of one HTTP request, seconds.")
    d.float("download_deadline", None, "Most seconds one image download attempt may take, "
            "headers to last byte (a server trickling bytes never trips --timeout); past it "
            "the attempt is retried like a timeout. Unset: 10 x --timeout; 0: no deadline.",
            lower_bound=0.0)


def fetch_config(fv):
    """`ish_tf.data.allen.FetchConfig` from the fetch flags.

    Raises:
      ValueError: --genes names a file that cannot be read.
    """
    from ish_tf.data.allen import FetchConfig, read_gene_list

    return FetchConfig(
        study=fv.study, out=fv.out, api_url=fv.api_url, genes=read_gene_list(fv.genes),
        max_images=fv.max_images, sections_per_experiment=fv.sections_per_experiment,
        downsample=fv.downsample, workers=fv.workers, plane=fv.plane, page_size=fv.page_size,
        retries=fv.retries, backoff_base=fv.backoff_base, max_retry_after=fv.max_retry_after,
        timeout=fv.timeout, download_deadline=fv.download_deadline)


def define_flags(fv) -> None:
    define_common(fv, small_run=False)
    define_fetch(fv)


def main(fv, argv: list[str]) -> int:
    """Runs the fetch stage; returns the exit status (0 ok, 1 API/manifest error, 130 Ctrl-C)."""
    from absl import logging

    from ish_tf.data import allen
    from ish_tf.data.manifest import ManifestError

    with usage_errors():
        cfg = fetch_config(fv)
        cfg.validate()
    os.makedirs(cfg.out, exist_ok=True)
    config.write_flagfile(os.path.join(cfg.out, "fetch_flags.cfg"), fv)
    logging.info("fetching study %s from %s into %s", cfg.study, cfg.api_url, cfg.out)
    try:
        result = allen.fetch(cfg)
    except allen.FetchInterrupted as e:
        print(f"fetch: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("fetch: interrupted before any download; nothing new was written", file=sys.stderr)
        return 130
    except (allen.AllenApiError, ManifestError) as e:
        print(f"fetch: error: {e}", file=sys.stderr)
        return 1
    for line in allen.summary_lines(result):
        print(line)
    # Partial success is still a success for the stage; failures.csv says what to retry.
    return 0


if __name__ == "__main__":
    run(NAME, define_flags, main, tensorflow=USES_TENSORFLOW)

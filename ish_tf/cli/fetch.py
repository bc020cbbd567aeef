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

from absl import app, logging

from ish_tf import flags

flags.define_common()
flags.define_fetch()
FLAGS = flags.FLAGS


def main(argv: list[str]) -> int:
    """Runs the fetch stage; returns the exit status (0 ok, 1 API/manifest error, 130 Ctrl-C)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ish_tf.data import allen
    from ish_tf.data.manifest import ManifestError

    try:
        config = flags.fetch_config(FLAGS)
        config.validate()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    os.makedirs(config.out, exist_ok=True)
    flags.write_flagfile(os.path.join(config.out, "fetch_flags.cfg"))
    logging.info("fetching study %s from %s into %s", config.study, config.api_url, config.out)
    try:
        result = allen.fetch(config)
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
    app.run(main)

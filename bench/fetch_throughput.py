"""Fetch throughput against the local fake Allen API: images/s with 1 vs N workers.

Run by hand (not a test):
    .venv/bin/python bench/fetch_throughput.py [--images 200] [--delay 0.02] [--workers 4]

The fake server (tests/allen_fake_server.py) sleeps `--delay` seconds per image, which
stands in for the real host's latency; the baseline is the same fetch with 1 worker,
measured in this script, so the printed ratio is the speed-up from concurrency.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from allen_fake_server import FakeAllen, make_study, serve  # noqa: E402

from ish_tf.data import allen  # noqa: E402


def run(url: str, workers: int, n_images: int) -> float:
    """Fetches `n_images` into a fresh directory; returns images per second."""
    with tempfile.TemporaryDirectory() as out:
        config = allen.FetchConfig(out=out, api_url=url, workers=workers, max_images=n_images,
                                   page_size=200, progress=False, downsample=0)
        start = time.perf_counter()
        result = allen.fetch(config)
        elapsed = time.perf_counter() - start
        assert result.downloaded == n_images, allen.summary_lines(result)
    return n_images / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--delay", type=float, default=0.02, help="server delay per image, s")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    per_set = 4
    fake = FakeAllen(make_study(n_genes=args.images // per_set + 1, donors_per_gene=1,
                                images_per_set=per_set), image_delay=args.delay)
    with serve(fake) as url:
        run(url, 1, min(8, args.images))  # warm-up: imports, JPEG cache of the fake server
        base = run(url, 1, args.images)
        fast = run(url, args.workers, args.images)
    print(f"images={args.images} server_delay={args.delay * 1000:.0f}ms")
    print(f"workers=1: {base:.1f} images/s")
    print(f"workers={args.workers}: {fast:.1f} images/s")
    print(f"speed-up (workers={args.workers} vs 1): {fast / base:.2f}x")


if __name__ == "__main__":
    main()

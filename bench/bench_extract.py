"""Benchmark: end-to-end `run_extract` throughput, full-resolution vs `--fast_decode`, with PSNR.

Run by hand (not a test):
  .venv/bin/python bench/bench_extract.py [--images=8 --height=2048 --width=2560]
      [--source_size=1024 --patch_size=256 --n=50 --workers=1,2] [--data_dir=DIR]
      [--allen] [--modes=full,fast,beam] [--psnr_windows=20] [--costs]

Renders synthetic sections (`ish_tf.data.synthetic`, Allen-like sizes by default), reuses
a dataset directory holding manifest.csv (`--data_dir`), or (`--allen`) builds a manifest
of the real Allen section of ../shared/data/allen listed `--images` times under distinct
image ids (one real section read N times: decode, mask and sampling are real, the
variety is not). Then runs the whole extract stage (decode, classical mask, sampling,
crop + resize, JPEG encode, TFRecord shards, index) into a fresh directory per worker
count and mode, in this one process, and prints images/s, patches/s, patches/s per
worker and the ratio of the fast path over the full-resolution one in the same run;
mode `beam` runs the fast path as `bin/extract --runner=beam` (Beam's FnApiRunner, start-up
included) against the local fast runner.
Masks are recomputed in every run (fresh output directories, no mask cache).

Fidelity: for up to `--psnr_windows` windows per image chosen by the fast run, the
fast crop (`fast_decode.WindowCropper` on the reduced decode) is compared with the
full-resolution Lanczos patch of the same window (`patch_sampling.crop_and_resize`),
before JPEG encoding; PSNR in dB (mean, 5th percentile, minimum). Also prints the share
of fast-run windows that the full-resolution run chose too (the masks differ slightly).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ish_tf.data import patches as P  # noqa: E402
from ish_tf.data.synthetic import SynthConfig, generate_dataset  # noqa: E402

ALLEN = os.path.join(ROOT, "..", "shared", "data", "allen", "mouse_prox1_sagittal_ds2.jpg")


def allen_manifest(out: str, n: int) -> str:
    """A manifest of the real Allen section listed n times (ids 1..n, genes G0.., 2 donors)."""
    import pandas as pd
    from PIL import Image

    path = os.path.abspath(ALLEN)
    with Image.open(path) as im:
        w, h = im.size
    rows = [dict(image_id=i + 1, experiment_id=i + 1, study="allen", gene_symbol=f"G{i // 2}",
                 donor_id=f"D{i % 2}", width=w, height=h, path=path) for i in range(n)]
    os.makedirs(out, exist_ok=True)
    pd.DataFrame(rows).to_csv(os.path.join(out, "manifest.csv"), index=False)
    return out


def windows_of(out: str) -> dict[int, list[tuple[int, int]]]:
    """image_id -> [(x, y), ...] of the records of a records directory."""
    import tensorflow as tf

    from ish_tf.data import records

    found: dict[int, list[tuple[int, int]]] = {}
    for path in sorted(tf.io.gfile.glob(os.path.join(out, "*.tfrecord"))):
        for raw in tf.data.TFRecordDataset(path).as_numpy_iterator():
            ex = tf.train.Example.FromString(raw).features.feature
            found.setdefault(int(ex["image_id"].int64_list.value[0]), []).append(
                (int(ex["x"].int64_list.value[0]), int(ex["y"].int64_list.value[0])))
    del records
    return found


def psnr_of(manifest: str, windows: dict[int, list[tuple[int, int]]], size: int, out_size: int,
            per_image: int) -> np.ndarray:
    """PSNR (dB) of fast crops against full-resolution Lanczos patches of the same windows."""
    import pandas as pd
    from PIL import Image

    from ish_tf.data import fast_decode as F
    from ish_tf.data.manifest import image_path
    from ish_tf.data.patch_sampling import crop_and_resize

    df = pd.read_csv(manifest)
    c = F.crop_decode_scale(size, out_size)
    values = []
    for row in df.itertuples():
        wins = windows.get(int(row.image_id), [])[:per_image]
        if not wins:
            continue
        path = image_path(manifest, str(row.path))
        with Image.open(path) as im:
            full = im.convert("RGB")
        small, _, _ = F.open_scaled(path, c)
        cropper = F.WindowCropper(small, c, size, out_size)
        for x, y in wins:
            a = np.asarray(crop_and_resize(full, x, y, size, out_size), np.float64)
            b = np.asarray(cropper.crop(x, y), np.float64)
            mse = max(float(((a - b) ** 2).mean()), 1e-10)
            values.append(10 * np.log10(255.0 ** 2 / mse))
    return np.asarray(values)


def stage_costs(manifest: str, size: int, out_size: int, n: int, repeats: int = 3) -> None:
    """Prints the per-core cost of each extraction step on the manifest's first images.

    Median over `repeats` of each step, per image and per patch (n patches per image):
    decode (full / at 1/d), mask (on each), sampling, crop (Lanczos from the full image /
    from the reduced one), JPEG encode, and writing the records (TFRecordWriter).
    """
    import pandas as pd
    import tensorflow as tf
    from PIL import Image

    from ish_tf.data import fast_decode as F
    from ish_tf.data import patch_sampling as S
    from ish_tf.data import records
    from ish_tf.data.manifest import image_path
    from ish_tf.data.segment import MaskConfig, compute_mask

    def timed(fn, k: int = repeats) -> tuple[float, object]:
        times, out = [], None
        for _ in range(k):
            t = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t)
        return float(np.median(times)) * 1000, out

    df = pd.read_csv(manifest)
    d = F.decode_scale(size, out_size)
    c = F.crop_decode_scale(size, out_size)
    rows: dict[str, list[float]] = {}
    def one(path: str) -> None:
        ms, rgb = timed(lambda: S.read_rgb(path))
        rows.setdefault("decode full", []).append(ms)
        ms, opened = timed(lambda: F.open_scaled(path, c))
        rows.setdefault(f"decode 1/{c}", []).append(ms)
        ms, small = timed(lambda: np.asarray(opened[0].reduce(d // c) if d > c else opened[0]))
        rows.setdefault(f"box reduce to 1/{d} (for the mask)", []).append(ms)
        ms, mask = timed(lambda: compute_mask(rgb, MaskConfig()), 1)
        rows.setdefault("mask full", []).append(ms)
        ms, small_mask = timed(lambda: compute_mask(small, MaskConfig()), 1)
        rows.setdefault(f"mask 1/{d}", []).append(ms)
        ms, corners = timed(lambda: S.sample_patches(
            mask, n=n, size=size, min_fraction=0.9, max_tries=500, rng=S.image_rng(0, 1)))
        rows.setdefault("sample full", []).append(ms)
        ms, _ = timed(lambda: F.sample_patches_scaled(
            small_mask, d, rgb.shape[0], rgb.shape[1], n=n, size=size, min_fraction=0.9,
            max_tries=500, rng=S.image_rng(0, 1)))
        rows.setdefault(f"sample 1/{d}", []).append(ms)
        if not corners:
            return
        full, reduced = Image.fromarray(rgb), opened[0]
        k = len(corners)
        ms, crops = timed(lambda: [S.crop_and_resize(full, x, y, size, out_size)
                                   for x, y in corners])
        rows.setdefault("crop+resize full (all patches)", []).append(ms * n / k)
        def fast_crops():
            cropper = F.WindowCropper(reduced, c, size, out_size)
            return [cropper.crop(x, y) for x, y in corners]
        ms, _ = timed(fast_crops)
        rows.setdefault(f"crop from 1/{c} (all patches, phase passes included)", []).append(
            ms * n / k)
        ms, encoded = timed(lambda: [S.encode_patch(c, "jpeg", 90) for c in crops])
        rows.setdefault("JPEG encode (all patches)", []).append(ms * n / k)
        examples = [records.make_example(
            image_encoded=e, patch_index=i, x=0, y=0, source_size=size, image_format="jpeg",
            image_height=out_size, image_width=out_size, image_id=1, gene_symbol="G",
            gene_index=0, entrez_id=1, donor_id="D", donor_index=0, region="", study="")
            for i, e in enumerate(encoded)]

        def write(examples=examples):
            with tempfile.TemporaryDirectory() as t:
                with tf.io.TFRecordWriter(os.path.join(t, "x.tfrecord")) as w:
                    for ex in examples:
                        w.write(ex)
        ms, _ = timed(write)
        rows.setdefault("example + TFRecord write (all patches)", []).append(ms * n / k)
    for row in list(df.itertuples())[:2]:
        one(image_path(manifest, str(row.path)))
    print(f"per-core cost of each step, ms per image (median of {repeats}; {n} patches per "
          f"image; mean over {len(next(iter(rows.values())))} image(s)):")
    for name, values in rows.items():
        print(f"  {name:<40} {np.mean(values):8.1f} ms   {np.mean(values) / n:6.2f} ms/patch")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--height", type=int, default=2048)
    ap.add_argument("--width", type=int, default=2560)
    ap.add_argument("--source_size", type=int, default=1024)
    ap.add_argument("--patch_size", type=int, default=256)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--modes", default="full,fast")
    ap.add_argument("--psnr_windows", type=int, default=20)
    ap.add_argument("--data_dir", default="", help="reuse a dataset directory (manifest.csv)")
    ap.add_argument("--allen", action="store_true", help="the real Allen section, --images times")
    ap.add_argument("--costs", action="store_true", help="also time each step on 2 images")
    args = ap.parse_args()

    import tensorflow as tf  # noqa: F401  (import cost kept out of the first timing)

    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        data = args.data_dir
        if args.allen:
            data = allen_manifest(os.path.join(tmp, "allen"), args.images)
            print(f"manifest: the real Allen section ({ALLEN}) listed {args.images} times")
        elif not data:
            data = os.path.join(tmp, "synth")
            n_genes = max(3, (args.images + 1) // 2)
            t = time.perf_counter()
            generate_dataset(SynthConfig(out_dir=data, n_genes=n_genes, n_groups=n_genes,
                                         n_donors=2, donors_per_gene=2, images_per_gene_donor=1,
                                         height=args.height, width=args.width, seed=0))
            print(f"rendered {2 * n_genes} synthetic {args.width}x{args.height} sections in "
                  f"{time.perf_counter() - t:.1f} s")
        manifest = os.path.join(data, "manifest.csv")
        if args.costs:
            stage_costs(manifest, args.source_size, args.patch_size, args.n)
        rates: dict[tuple[str, int], float] = {}
        outs: dict[str, str] = {}
        for workers in [int(w) for w in args.workers.split(",")]:
            for mode in args.modes.split(","):
                out = os.path.join(tmp, f"out_{mode}_{workers}")
                outs.setdefault(mode, out)
                cfg = P.ExtractConfig(manifest=manifest, out_dir=out,
                                      patches_per_image=args.n, source_size=args.source_size,
                                      patch_size=args.patch_size, workers=workers, num_shards=2,
                                      fast_decode=mode in ("fast", "beam"))
                t = time.perf_counter()
                if mode == "beam":  # the fast path on Beam's FnApiRunner, start-up included
                    from ish_tf.data.beam_extract import run_extract_beam

                    summary = run_extract_beam(cfg)
                else:
                    summary = P.run_extract(cfg, progress_enabled=False)
                dt = time.perf_counter() - t
                images = sum(s["images"] for s in summary["splits"].values())
                n_patches = sum(s["patches"] for s in summary["splits"].values())
                rates[mode, workers] = n_patches / dt
                base = rates.get(("full", workers))
                ratio = f", {n_patches / dt / base:.2f}x of full" if base and mode != "full" else ""
                if mode == "beam" and ("fast", workers) in rates:
                    ratio += f", {n_patches / dt / rates['fast', workers]:.2f}x of fast local"
                print(f"{mode:<4} workers={workers}: {images} images, {n_patches} patches in "
                      f"{dt:.2f} s -> {images / dt:.2f} images/s, {n_patches / dt:.1f} patches/s, "
                      f"{n_patches / dt / workers:.1f} per worker{ratio} "
                      f"(load {os.getloadavg()[0]:.2f})")
        if "fast" in outs and args.psnr_windows > 0:
            fast_windows = windows_of(outs["fast"])
            values = psnr_of(manifest, fast_windows, args.source_size, args.patch_size,
                             args.psnr_windows)
            if len(values):
                print(f"PSNR fast vs full-resolution Lanczos, {len(values)} windows: mean "
                      f"{values.mean():.1f} dB, 5th percentile {np.percentile(values, 5):.1f}, "
                      f"min {values.min():.1f} (bar: 35 dB)")
            if "full" in outs:
                full_windows = windows_of(outs["full"])
                same = sum(len(set(w) & set(full_windows.get(i, []))) for i, w in
                           fast_windows.items())
                total = sum(len(w) for w in fast_windows.values())
                print(f"windows shared with the full-resolution run: {same} of {total} "
                      f"({same / max(total, 1):.0%}; the masks differ at tissue edges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

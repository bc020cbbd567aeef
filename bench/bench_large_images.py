"""Large and whole-slide images through bin/ingest -> bin/extract: warnings and peak memory.

Builds, from the real Allen section (../shared/data/allen), a 16000x12000 JPEG (the
section scaled up on a white slide) and the same image as a tiled pyramidal OME-TIFF
(levels 1, 1/2, 1/4, 1/8), then runs `bin/ingest --downsample=8` and `bin/extract` on
each as child processes and reports each child's peak RSS (`ru_maxrss` of the waited-for
process) and whether anything on stderr mentions a warning. The baseline in the same
script: the JPEG ingested without --downsample and extracted at full resolution (with
--max_pixels raised to allow it), i.e. what reading a whole 192 MP image costs.

  PYTHONPATH=. python bench/bench_large_images.py [--work=/tmp/bench_large]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLEN = os.path.join(ROOT, "..", "..", "shared", "data", "allen", "mouse_prox1_sagittal_ds2.jpg")
W, H = 16000, 12000


def build(work: str) -> None:
    """The 16000x12000 JPEG and pyramidal TIFF (in a child, so their memory is not counted)."""
    import tifffile

    Image.MAX_IMAGE_PIXELS = None
    os.makedirs(os.path.join(work, "images"), exist_ok=True)
    src = Image.open(os.environ.get("ALLEN_IMAGE", ALLEN)).convert("RGB")
    scale = min(W / src.width, H / src.height) * 0.95
    big = src.resize((round(src.width * scale), round(src.height * scale)), Image.BILINEAR)
    canvas = Image.new("RGB", (W, H), (248, 248, 250))
    canvas.paste(big, ((W - big.width) // 2, (H - big.height) // 2))
    canvas.save(os.path.join(work, "images", "big.jpg"), quality=90)
    rgb = np.asarray(canvas)
    um = 1.049 * 2 / scale  # the Allen section's scale at downsample 2, scaled up
    with tifffile.TiffWriter(os.path.join(work, "images", "big.ome.tif"), ome=True,
                             bigtiff=True) as tw:
        tw.write(rgb, tile=(512, 512), subifds=3,
                 metadata={"PhysicalSizeX": um, "PhysicalSizeY": um})
        for n in (2, 4, 8):
            tw.write(np.asarray(canvas.reduce(n)), tile=(512, 512), subfiletype=1)
    with open(os.path.join(work, "table.csv"), "w") as f:
        f.write("path,gene_symbol,donor_id\nbig.jpg,Prox1,d1\nbig.ome.tif,Prox1b,d2\n")
    # The reference: the real section as it is (2980x1888), what any extraction costs.
    src.save(os.path.join(work, "images", "allen.jpg"), quality=95)
    with open(os.path.join(work, "reference.csv"), "w") as f:
        f.write("path,gene_symbol,donor_id\nallen.jpg,Prox1,d1\n")


def child_peak(cmd: list[str], env: dict) -> tuple[float, float, str, int]:
    """Runs `cmd` under a fresh Python parent so RUSAGE_CHILDREN covers that child only."""
    code = ("import resource,subprocess,sys,time;t=time.time();"
            "p=subprocess.run(sys.argv[1:],capture_output=True,text=True);"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,time.time()-t,"
            "p.returncode);sys.stderr.write(p.stdout+p.stderr)")
    p = subprocess.run([sys.executable, "-c", code, *cmd], env=env, capture_output=True,
                       text=True, cwd=ROOT)
    peak, secs, rc = p.stdout.split()
    return float(peak), float(secs), p.stderr, int(rc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/bench_large")
    ap.add_argument("--skip_build", action="store_true")
    args = ap.parse_args()
    work = args.work
    env = dict(os.environ, PYTHONPATH=ROOT, ISH_TF_VENV=os.environ.get("ISH_TF_VENV", ""))
    if not args.skip_build:
        t0 = time.time()
        subprocess.run([sys.executable, "-c", f"import sys;sys.path.insert(0,{ROOT!r});"
                        f"from bench.bench_large_images import build;build({work!r})"],
                       check=True, env=env, cwd=ROOT)
        print(f"# built 16000x12000 JPEG + pyramidal OME-TIFF in {time.time() - t0:.0f} s")
    sizes = {n: os.path.getsize(os.path.join(work, "images", n)) / 2**20
             for n in ("big.jpg", "big.ome.tif")}
    print("# files: " + ", ".join(f"{n} {s:.0f} MiB" for n, s in sizes.items()))
    extract_flags = ["--source_size=128", "--patch_size=64", "--patches_per_image=20",
                     "--num_shards=1", "--split_fractions=1,0,0", "--workers=1"]
    cases = [
        ("reference: the 2980x1888 Allen JPEG", "reference.csv", [], []),
        ("16000x12000 JPEG + pyramidal TIFF, --downsample=8", "table.csv", ["--downsample=8"],
         []),
        ("the same at full resolution (baseline)", "table.csv", [],
         ["--source_size=1024", "--max_pixels=250000000"]),
    ]
    print("| run | stage | peak RSS MiB | seconds | warnings | exit |")
    print("|---|---|---|---|---|---|")
    for k, (name, table, ingest_extra, extract_extra) in enumerate(cases):
        tag = f"case{k}"
        m = os.path.join(work, f"manifest_{tag}")
        r = os.path.join(work, f"records_{tag}")
        for stage, cmd in (
                ("ingest", [os.path.join(ROOT, "bin", "ingest"),
                            f"--table={os.path.join(work, table)}",
                            f"--images={os.path.join(work, 'images')}", f"--out={m}",
                            *ingest_extra]),
                ("extract", [os.path.join(ROOT, "bin", "extract"),
                             f"--manifest={os.path.join(m, 'manifest.csv')}", f"--out={r}",
                             *extract_flags, *extract_extra])):
            peak, secs, text, rc = child_peak(cmd, env)
            warned = [line for line in text.splitlines()
                      if "warn" in line.lower() or "DecompressionBomb" in line]
            print(f"| {name} | {stage} | {peak:.0f} | {secs:.0f} | "
                  f"{len(warned)}{' (' + warned[0][:80] + ')' if warned else ''} | {rc} |",
                  flush=True)
            if rc:
                print(text[-2000:], file=sys.stderr)
        report = os.path.join(r, "extract_report.csv")
        if os.path.exists(report):
            print("#", name, "report:", open(report).read().strip().replace("\n", " | "))


if __name__ == "__main__":
    main()

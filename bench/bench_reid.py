"""Benchmark of blocked re-identification at the Cortex Study's size.

Run by hand (not a test)::

    .venv/bin/python bench/bench_reid.py            # full size, ~1-3 min
    .venv/bin/python bench/bench_reid.py --n 5000 --naive_n 2000   # quick

What it measures, on synthetic embeddings shaped like the Cortex Study
(23,258 images × 128-d, ~1,000 genes over 42 donors, most genes in 3 donors;
each image = gene centroid + donor offset + noise):

1. `evaluate_reid` wall time for other-donor rank-1 alone (no mAP; best of --repeat
   calls) and for all three candidate sets with mAP (one call), each with BLAS
   limited to 1 thread and with the default BLAS thread count (threadpoolctl). The
   Python code itself is single-threaded.
2. Peak memory of those calls, measured with `tracemalloc` (it sees every NumPy
   buffer; BLAS's small internal work buffers are not included), against the size
   a dense N×N float32 matrix would take.
3. The dense reference (`naive_rank1_other_donor`: full float64 distance matrix,
   NaN-masked, nanargmin, as the original code did) against the blocked rank-1 at a
   size where the dense matrix fits (default 6,000), 1 BLAS thread, best of
   --repeat: wall times and their ratio,
   and a check that both give the same rank-1.

Goal (issue 4): under 10 s and under 1 GiB for other-donor rank-1 at full size.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

from ish_tf.evaluate.reid import evaluate_reid, naive_rank1_other_donor  # noqa: E402


def cortex_like(n: int, dim: int, n_genes: int, n_donors: int, seed: int = 0,
                noise: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic (N, D) embeddings with Cortex-Study-like gene × donor design.

    90% of genes are assayed in 3 donors, the rest in 1 to n_donors; images are
    spread over the gene × donor pairs at random (at least one per pair).

    Returns:
      values (N, D) float32, genes (N,) int, donors (N,) int.
    """
    rng = np.random.default_rng(seed)
    pairs = []
    for gene in range(n_genes):
        k = 3 if rng.random() < 0.9 else int(rng.integers(1, n_donors + 1))
        for donor in rng.choice(n_donors, size=min(k, n_donors), replace=False):
            pairs.append((gene, int(donor)))
    pairs = np.asarray(pairs)
    extra = rng.multinomial(n - len(pairs), np.full(len(pairs), 1.0 / len(pairs)))
    per_pair = 1 + extra
    idx = np.repeat(np.arange(len(pairs)), per_pair)
    rng.shuffle(idx)
    genes, donors = pairs[idx, 0], pairs[idx, 1]
    gene_c = rng.normal(size=(n_genes, dim))
    donor_c = 0.8 * rng.normal(size=(n_donors, dim))
    values = gene_c[genes] + donor_c[donors] + noise * rng.normal(size=(n, dim))
    return values.astype(np.float32), genes, donors


def timed(fn, *args, repeat: int = 1, **kw):
    """(result, best wall time of `repeat` calls): the minimum is the least disturbed by load."""
    best = float("inf")
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        best = min(best, time.perf_counter() - t0)
    return out, best


def peak_bytes(fn, *args, **kw) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        fn(*args, **kw)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=23258)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--genes", type=int, default=1000)
    p.add_argument("--donors", type=int, default=42)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--naive_n", type=int, default=6000)
    p.add_argument("--skip_map", action="store_true", help="skip the (slower) mAP run")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed calls per rank-1 measurement (best is printed); mAP runs once")
    args = p.parse_args()

    blas = [(i.get("internal_api"), i.get("num_threads")) for i in threadpool_info()]
    print(f"BLAS pools (default threads): {blas}; os.cpu_count()={os.cpu_count()}; "
          f"load average {os.getloadavg()[0]:.1f} (timings on a loaded machine are inflated)")
    x, g, d = cortex_like(args.n, args.dim, args.genes, args.donors)
    print(f"data: {args.n} x {args.dim}, {len(np.unique(g))} genes, {len(np.unique(d))} donors, "
          f"block_size={args.block_size}")

    runs = [("other-donor rank-1 only", dict(candidate_sets=("other_donor",),
                                             compute_map=False), args.repeat)]
    if not args.skip_map:
        runs.append(("3 candidate sets + mAP", dict(compute_map=True), 1))
    dense_bytes = args.n * args.n * 4
    for label, kw, repeat in runs:
        for threads in (1, None):
            with threadpool_limits(limits=threads):
                df, sec = timed(evaluate_reid, x, g, d, block_size=args.block_size,
                                repeat=repeat, **kw)
            name = "1 BLAS thread" if threads == 1 else "default BLAS threads"
            print(f"{label:26s} {name:21s} {sec:7.2f} s")
        with threadpool_limits(limits=1):
            peak = peak_bytes(evaluate_reid, x, g, d, block_size=args.block_size, **kw)
        print(f"{label:26s} peak traced memory {peak / 2**20:8.1f} MiB "
              f"(dense N x N float32 would be {dense_bytes / 2**20:.0f} MiB)")
        print(df.to_string(index=False, float_format=lambda v: f"{v:.4f}"))

    m = min(args.naive_n, args.n)
    xs, gs, ds = x[:m], g[:m], d[:m]
    with threadpool_limits(limits=1):
        ref, t_naive = timed(naive_rank1_other_donor, xs, gs, ds, repeat=args.repeat)
        blk, t_blk = timed(evaluate_reid, xs, gs, ds, block_size=args.block_size,
                           candidate_sets=("other_donor",), compute_map=False,
                           repeat=args.repeat)
        peak_naive = peak_bytes(naive_rank1_other_donor, xs, gs, ds)
        peak_blk = peak_bytes(evaluate_reid, xs, gs, ds, block_size=args.block_size,
                              candidate_sets=("other_donor",), compute_map=False)
    r1 = float(blk["rank1"].iloc[0])
    print(f"\nat N={m} (1 BLAS thread): dense NaN-masked {t_naive:.2f} s, "
          f"{peak_naive / 2**20:.0f} MiB; blocked {t_blk:.2f} s, {peak_blk / 2**20:.0f} MiB")
    print(f"speed-up blocked vs dense: {t_naive / t_blk:.1f}x; memory ratio "
          f"{peak_naive / max(peak_blk, 1):.1f}x; rank-1 dense {ref:.4f} blocked {r1:.4f} "
          f"({'same' if abs(ref - r1) < 1e-12 else 'DIFFERENT'})")


if __name__ == "__main__":
    main()

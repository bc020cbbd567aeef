"""Switch pooling: `tf.nn.max_pool_with_argmax` ("kernel") vs the XLA-compilable "window"
implementation, with and without XLA, in the CDAE's train step.

The baseline is the kernel implementation without XLA (what every run used before
`--jit_compile` could compile the CDAE), measured in the same process; the script
repeats the measurements in alternating order (--repeats) and reports the median ratio.

Usage:
  .venv/bin/python bench/bench_switch_pooling.py [--configs configs/cdae_quickstart.cfg
      configs/cdae_mouse.cfg] [--steps=30] [--repeats=3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_cdae import ROOT, throughput  # noqa: E402

VARIANTS = (("kernel", False), ("window", False), ("window", True))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*",
                    default=[os.path.join(ROOT, "configs", "cdae_quickstart.cfg")])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for flagfile in args.configs:
        rates: dict[tuple[str, bool], list[float]] = {v: [] for v in VARIANTS}
        shape = ""
        for r in range(args.repeats):
            order = VARIANTS if r % 2 == 0 else tuple(reversed(VARIANTS))
            for impl, jit in order:
                rate, shape = throughput(flagfile, "switches", args.steps,
                                         pool_implementation=impl, jit=jit)
                rates[(impl, jit)].append(rate)
        base = statistics.median(rates[("kernel", False)])
        print(f"\n{os.path.basename(flagfile)} ({shape}), train step, {args.repeats} repeats:")
        for (impl, jit), values in rates.items():
            med = statistics.median(values)
            print(f"  {impl:6s} {'XLA' if jit else '   '}  {med:8.1f} img/s  "
                  f"ratio to kernel {med / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

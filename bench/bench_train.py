"""Training throughput (images/s) of the shared trainer (run by hand; not a test).

For each model -- the quickstart small CNN (64x64, P=8 K=8) and ResNet50 at 256x256
(P=2 K=2 on CPU by default; use --resnet_P=17 --resnet_K=17 on a GPU) -- it measures,
in the same process and on the same in-memory P x K batches:

  (a) `ish_tf.train.trainer.train` (the real loop: strategy.run, cross-replica
      gather, triplet loss + stats, NaN check, metrics rows): 2 x N steps with
      --log_every=N; the rate of the second interval (the first one traces);
  (b) the baseline: a bare `tf.function` step (GradientTape, triplet loss, Adam)
      on the same model and batches, with the same --jit_compile / --mixed_precision,
      N steps after --warmup steps.

It prints images/s for both, (a)/(b) (goal >= 0.9: the trainer adds little beyond
the model's own compute), and the quickstart/ResNet50 throughput ratio.

    .venv/bin/python bench/bench_train.py                     # CPU, ~1-2 min
    .venv/bin/python bench/bench_train.py --mixed_precision --jit_compile \\
        --resnet_P=17 --resnet_K=17 --steps=20                 # GPU
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ish_tf.families import (  # noqa: E402
    ModelConfig,
    build_model,
    make_task,  # noqa: E402
)
from ish_tf.families.triplet.config import TripletConfig  # noqa: E402
from ish_tf.losses.triplet import triplet_loss  # noqa: E402
from ish_tf.train import TrainConfig  # noqa: E402
from ish_tf.train.strategy import set_precision  # noqa: E402
from ish_tf.train.trainer import train  # noqa: E402


def _batches(P: int, K: int, size: int, n: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, P * K, size, size, 3)).astype("float32")
    y = np.stack([np.repeat(rng.choice(1000, P, replace=False), K) for _ in range(n)]).astype("int32")
    return x, y


def bench_trainer(model_cfg: ModelConfig, P: int, K: int, steps: int, warmup: int,
                  args, run_dir: str) -> float:
    """Images/s of `train` over `steps` steps after `warmup` steps (incl. tracing)."""
    x, y = _batches(P, K, model_cfg.input_size)
    model_cfg = dataclasses.replace(model_cfg, family=dataclasses.replace(model_cfg.family,
                                                                          P=P, K=K))
    # Warm-up = one log interval of `steps` steps (tracing included), then one timed interval.
    del warmup
    cfg = TrainConfig(run_dir=run_dir, steps=2 * steps, decay_start=2 * steps,
                      log_every=steps, checkpoint_every=10**9, image_summaries=False,
                      strategy=args.strategy, mixed_precision=args.mixed_precision,
                      jit_compile=args.jit_compile, learning_rate=1e-4)
    task = make_task(model_cfg, cfg, lambda ctx: tf.data.Dataset.from_tensor_slices((x, y)).repeat())
    t0 = time.perf_counter()
    result = train(task, cfg)
    wall = time.perf_counter() - t0
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
        rows = {int(r["step"]): float(r["elapsed_s"]) for r in csv.DictReader(f)}
    # Steady state: from the row at the end of the warm-up (tracing included there)
    # to the last step; the final checkpoint and model.keras are written after it.
    rate = P * K * steps / (rows[2 * steps] - rows[steps])
    print(f"    trainer:  {rate:8.1f} images/s (whole call incl. build, tracing, saving: "
          f"{P * K * 2 * steps / wall:.1f}), loss {result.loss:.3f}")
    return rate


def bench_baseline(model_cfg: ModelConfig, P: int, K: int, steps: int, warmup: int, args) -> float:
    """Images/s of a bare GradientTape + Adam step on the same model and data."""
    policy = set_precision(args.mixed_precision)
    model = build_model(model_cfg)
    optimizer = keras.optimizers.Adam(1e-4, epsilon=1e-8)
    if policy == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    x, y = _batches(P, K, model_cfg.input_size)
    model_cfg = dataclasses.replace(model_cfg, family=dataclasses.replace(model_cfg.family,
                                                                          P=P, K=K))
    data = [(tf.constant(x[i]), tf.constant(y[i])) for i in range(len(x))]

    def step(images, labels):
        with tf.GradientTape() as tape:
            loss, _ = triplet_loss(labels, model(images, training=True))
            scaled = optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    step = tf.function(step, jit_compile=args.jit_compile)
    for i in range(warmup):
        step(*data[i % len(data)]).numpy()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(*data[i % len(data)])
    loss.numpy()
    rate = P * K * steps / (time.perf_counter() - t0)
    print(f"    baseline: {rate:8.1f} images/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="quickstart,resnet50")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick_steps", type=int, default=20, help="timed steps of the small CNN")
    parser.add_argument("--resnet_P", type=int, default=2)
    parser.add_argument("--resnet_K", type=int, default=2)
    parser.add_argument("--resnet_size", type=int, default=256)
    parser.add_argument("--mixed_precision", action="store_true")
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--strategy", default="auto")
    args = parser.parse_args()

    print(f"devices: {[d.name for d in tf.config.list_logical_devices()]}; "
          f"mixed_precision={args.mixed_precision} jit_compile={args.jit_compile} "
          f"strategy={args.strategy}")
    setups = {
        "quickstart": (ModelConfig("triplet", input_size=64, seed=0, family=TripletConfig(
            backbone="small_cnn", backbone_weights="none", head_units=256, embedding_dim=64)),
            8, 8, args.quick_steps),
        "resnet50": (ModelConfig("triplet", input_size=args.resnet_size, seed=0,
                                 family=TripletConfig(backbone="resnet50", backbone_weights="none")),
                     args.resnet_P, args.resnet_K, args.steps),
    }
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            cfg, P, K, steps = setups[name]
            print(f"{name}: {cfg.backbone} {cfg.input_size}x{cfg.input_size}, batch {P}x{K}, "
                  f"{steps} timed steps after {args.warmup} warm-up")
            base = bench_baseline(cfg, P, K, steps, args.warmup, args)
            ours = bench_trainer(cfg, P, K, steps, args.warmup, args, os.path.join(tmp, name))
            rates[name] = ours
            print(f"    ratio trainer/baseline: {ours / base:.2f} (goal >= 0.9)")
    if len(rates) == 2:
        print(f"quickstart/resnet50 throughput ratio: {rates['quickstart'] / rates['resnet50']:.1f}x")


if __name__ == "__main__":
    main()

"""Sanity checks of the attribution maps (ish_tf.attribution) on synthetic ISH patches.

1. A dimension tied to a layer pattern: a triplet-family model (small_cnn backbone,
   embedding head, L2 normalisation) is trained so that pre-normalisation dimension 0
   reads the stain in one cortical layer of a patch and dimension 1 the stain in the
   rest of the tissue (targets from the generator's stain and layer maps). On held-out
   patches, each map's mean inside that layer over its mean in the rest of the tissue
   (> 1: the map falls on the layer) for dimension 0, for dimension 1 (the control) and
   for the randomly re-initialised model.
2. Model randomisation (Adebayo et al. 2018): Spearman rank correlation between the maps
   of the trained model and of the same architecture with fresh weights (low: the maps
   depend on what was learnt).
3. Completeness of integrated gradients: median |Σ attributions - (f(x) - f(x'))| /
   |f(x) - f(x')| for black, white and blurred baselines on the pre-normalisation
   output, and for the black baseline through the L2-normalised output.

    .venv/bin/python bench/bench_attribution.py [--sections 96] [--epochs 15] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from ish_tf import attribution as at  # noqa: E402
from ish_tf.data.synthetic import image_rng, render_section_full  # noqa: E402
from ish_tf.data.synthetic_specs import make_donors, make_genes  # noqa: E402

LAYER = 3  # layer 4 (index 3)


def patches(n_sections: int, size: int, patch: int, seed: int):
    rng = np.random.default_rng(seed)
    genes = make_genes(24, rng, n_groups=6)
    donors = make_donors(4, rng)
    imgs, layer_masks, tissue, targets, share = [], [], [], [], []
    for i in range(n_sections):
        gene, donor = genes[i % len(genes)], donors[i % len(donors)]
        r = render_section_full(gene, donor, image_rng(seed, i), size, size,
                                ("V1", "MTG")[i % 2])
        for _ in range(40):
            if len(imgs) >= 4 * (i + 1):
                break
            y, x = rng.integers(0, size - patch, 2)
            sl = (slice(y, y + patch), slice(x, x + patch))
            lay, msk = r.layers[sl], r.mask[sl]
            in_layer = lay == LAYER
            if msk.mean() < 0.9 or not 0.15 < in_layer.mean() < 0.6:
                continue
            od = r.stain_od[sl]
            imgs.append(r.rgb[sl].astype(np.float32))
            layer_masks.append(in_layer)
            tissue.append(msk)
            targets.append([od[in_layer].sum() / od.size, od[msk & ~in_layer].sum() / od.size])
            share.append(od[in_layer].sum() / max(od[msk].sum(), 1e-9))
    t = np.asarray(targets, np.float32)
    t = (t - t.mean(0)) / (t.std(0) + 1e-6)
    return (np.stack(imgs), np.stack(layer_masks), np.stack(tissue), t, np.asarray(share))


def train(model, images, targets, epochs: int, seed: int):
    import keras
    import tensorflow as tf

    amodel, _ = at.attribution_model(model)
    keras.utils.set_random_seed(seed)
    opt = keras.optimizers.Adam(1e-3)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            emb = amodel(x, training=True)[1]
            loss = tf.reduce_mean(tf.square(emb[:, :2] - y))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        perm = rng.permutation(len(images))
        losses = [float(step(tf.constant(images[perm[i:i + 32]]),
                             tf.constant(targets[perm[i:i + 32]])))
                  for i in range(0, len(perm) - 31, 32)]
        print(f"  epoch {epoch + 1}: mse {np.mean(losses):.3f}", flush=True)
    return amodel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=96)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--patch", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--test", type=int, default=96)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="bench_attr_")
    from ish_tf.families import ModelConfig, build_model
    from ish_tf.families.triplet.config import TripletConfig

    t0 = time.time()
    images, layer, tissue, targets, share = patches(args.sections, args.size, args.patch,
                                                    args.seed)
    n_test = min(args.test, len(images) // 4)
    tr, te = slice(n_test, None), slice(0, n_test)
    print(f"{len(images)} patches ({n_test} held out), {time.time() - t0:.1f}s")
    cfg = ModelConfig(model="triplet", input_size=args.patch, seed=args.seed,
                      family=TripletConfig(backbone="small_cnn", backbone_weights="none",
                                           embedding_dim=8, head_units=64,
                                           l2_normalize=True))
    model = build_model(cfg)
    amodel = train(model, images[tr], targets[tr], args.epochs, args.seed)
    pred = amodel(images[te], training=False)[1].numpy()[:, :2]
    r = [float(np.corrcoef(pred[:, j], targets[te][:, j])[0, 1]) for j in range(2)]
    print(f"held-out correlation of dims 0/1 with their targets: {r[0]:.3f} / {r[1]:.3f}")
    random_model, _ = at.attribution_model(at.randomised_copy(model))
    normalised, _ = at.attribution_model(model, strip_l2=False)
    x, lay, tis = images[te], layer[te], tissue[te]
    # Patches whose stain lies mostly in layer 4 (a layer-4 pattern), and mostly outside it.
    in4, out4 = share[te] > 0.5, share[te] < 0.2
    print(f"held-out patches with > 50% of their stain in layer 4: {in4.sum()}, < 20%: "
          f"{out4.sum()}")

    print("\n| map | dim 0, all | dim 1 (control), all | dim 0, randomised | dim 0, layer-4 "
          "patches | dim 1, layer-4 patches | dim 0, randomised, layer-4 patches | dim 0, "
          "patches stained elsewhere | rank corr. trained vs randomised (dim 0) |")
    print("|---|---|---|---|---|---|---|---|---|")
    shown = {}

    def heat_of(m, dim, method, base, signed):
        if method == "grad_cam":
            return at.grad_cam(m, x, dim)
        attr, _ = at.integrated_gradients(m, x, dim, base, args.steps)
        return at.positive_heat(attr) if signed else at.heat(attr)

    def conc(h, sel=None):
        c = at.layer_concentration(h, lay, tis)
        return np.nanmedian(c if sel is None else c[sel])

    for name, method, base, signed in (
            ("IG |attribution|, black baseline", "integrated_gradients", "black", False),
            ("IG |attribution|, white baseline", "integrated_gradients", "white", False),
            ("IG positive evidence, black baseline", "integrated_gradients", "black", True),
            ("IG positive evidence, white baseline", "integrated_gradients", "white", True),
            ("IG positive evidence, blurred baseline", "integrated_gradients", "blur", True),
            ("Grad-CAM", "grad_cam", "", True)):
        h0 = heat_of(amodel, 0, method, base, signed)
        h1 = heat_of(amodel, 1, method, base, signed)
        hr = heat_of(random_model, 0, method, base, signed)
        rho = at.rank_correlation(h0, hr)
        shown[name] = h0
        print(f"| {name} | {conc(h0):.2f} | {conc(h1):.2f} | {conc(hr):.2f} | "
              f"{conc(h0, in4):.2f} | {conc(h1, in4):.2f} | {conc(hr, in4):.2f} | "
              f"{conc(h0, out4):.2f} | {np.mean(rho):.3f} (median {np.median(rho):.3f}) |",
              flush=True)
    print("(median over held-out patches of the mean map inside layer 4 / its mean in the "
          "rest of the tissue; 1 = no preference)")

    print("\n| integrated gradients | median completeness error | 90th percentile |")
    print("|---|---|---|")
    for name, m, base in (("pre-normalisation, black", amodel, "black"),
                          ("pre-normalisation, white", amodel, "white"),
                          ("pre-normalisation, blurred", amodel, "blur"),
                          ("L2-normalised output, black", normalised, "black")):
        errs = []
        for dim in (0, 1):
            _, check = at.integrated_gradients(m, x, dim, base, args.steps)
            errs.append(check["completeness_error"])
        errs = np.concatenate(errs)
        print(f"| {name} ({args.steps} steps) | {np.median(errs):.4f} | "
              f"{np.percentile(errs, 90):.4f} |", flush=True)
    k = min(6, len(x))
    rows = ["IG positive evidence, white baseline", "Grad-CAM"]
    path = at.plot_maps(x[:k], [lay[:k].astype(np.float32)] + [shown[n][:k] for n in rows],
                        [f"test {i}" for i in range(k)], ["layer 4 (truth)", "IG (+, white)",
                                                          "Grad-CAM"],
                        os.path.join(out, "attribution_layer4.png"), "dimension 0 (layer 4 stain)")
    print(f"\nfigure: {path}; {time.time() - t0:.0f}s in all")


if __name__ == "__main__":
    main()

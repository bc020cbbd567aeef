"""Attribution maps per embedding dimension: integrated gradients and Grad-CAM.

For a patch x and an embedding dimension k, which pixels make emb(x)[k] what it is?

* Integrated gradients (Sundararajan et al. 2017): (x - x') ⊙ ∫₀¹ ∇f(x' + α(x - x')) dα,
  by the trapezoidal rule over `steps` points, with f = emb[:, k]. Completeness says
  the attributions sum to f(x) - f(x'); `completeness_error` reports how far they are
  (relative to |f(x) - f(x')|). f is the embedding *before* L2 normalisation: through
  the normalised output the gradient of 1/|e| explodes near the black image, and the
  check fails badly (attributions summing to 7.7e8 for an output change of 0.34 were
  seen). The baseline is white by default: a blank slide, what an ISH patch shows where
  nothing is stained, and the path along which completeness held best on synthetic
  patches (median relative error 0.1% with 64 steps, against 4% from black, whose 90th
  percentile reached 49%; bench/RESULTS.md); `black` and `blur` (the patch's colours
  without structure) are offered, each with its check.
* Grad-CAM (Selvaraju et al. 2017) on the last convolutional block: ReLU(Σ_c w_c A_c),
  w_c the spatial mean of ∂f/∂A_c, upsampled bilinearly to the patch.

Both run on the trained Keras model (RUN/model.keras); `attribution_model` rebuilds it
as image -> (last conv activations, pre-normalisation embedding) with the same weights.

Sanity checks as the literature asks (Adebayo et al. 2018): maps must change when the
weights are randomised (`randomised_copy`; Spearman rank correlation between the maps
of the trained and the randomised model, low = the map depends on what was learnt), and
on synthetic sections a dimension tied to a layer pattern must put its map on that layer
(`layer_concentration`). bench/bench_attribution.py reports both.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

BASELINES = ("blur", "black", "white")
METHODS = ("integrated_gradients", "grad_cam")


class AttributionError(ValueError):
    """A model or input that cannot be attributed; the message says which and why."""


# --------------------------------------------------------------------------- the model
def load_model(path: str):
    """The trained Keras model of a run directory (RUN/model.keras) or a .keras file.

    Raises:
      ish_tf.export.ExportError: missing or unreadable file (naming it).
    """
    from ish_tf.export.saved_model import load_keras_file
    if path.endswith(".keras"):
        model_path, run_dir = path, os.path.dirname(path)
    else:
        model_path, run_dir = os.path.join(path, "model.keras"), path
    return load_keras_file(model_path, run_dir)


def _is_l2(layer) -> bool:
    from ish_tf.models.heads import L2Normalize

    return isinstance(layer, L2Normalize)


def _rank4_layers(model) -> list:
    """Layers of a functional model whose output is a (B, H, W, C) map, in order."""
    import keras

    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4:
            out.append(layer)
    return out


def attribution_model(model, strip_l2: bool = True):
    """image -> (last conv activations (B, h, w, c), embedding (B, D)) with model's weights.

    The model must be a chain of stages (layers or nested functional models such as the
    triplet family's backbone and embedding head). The last stage holding a spatial
    (rank-4) output gives the activations; a trailing `L2Normalize` (as a stage, or as
    the last layer of the last nested model) is left out when `strip_l2`, so the
    embedding is the pre-normalisation one.

    Returns:
      (keras.Model, normalised): the rebuilt model and whether an L2 normalisation was
      removed.

    Raises:
      AttributionError: no spatial activation, several inputs, or not a chain.
    """
    import keras

    if len(model.inputs) != 1:
        raise AttributionError(f"model {model.name!r}: attribution needs one image input")
    stages = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    spatial = [i for i, s in enumerate(stages)
               if len(s.output.shape) == 4 or (isinstance(s, keras.Model) and _rank4_layers(s))]
    if not spatial:
        raise AttributionError(f"model {model.name!r}: no convolutional (B, H, W, C) "
                               "activation to attribute Grad-CAM to")
    at = spatial[-1]
    removed = False
    last = len(stages) - 1
    if strip_l2 and _is_l2(stages[last]):
        stages, last, removed = stages[:-1], last - 1, True
    inp = keras.Input(model.inputs[0].shape[1:], name="image")
    x, act = inp, None
    for i, stage in enumerate(stages):
        if i == at:
            if len(stage.output.shape) == 4:
                act = x = stage(x)
                continue
            conv = _rank4_layers(stage)[-1]
            sub = keras.Model(stage.inputs, [conv.output, stage.output], name=f"{stage.name}_cam")
            act, x = sub(x)
            continue
        if i == last and strip_l2 and isinstance(stage, keras.Model) and stage.layers and \
                _is_l2(stage.layers[-1]):
            stage = keras.Model(stage.inputs, stage.layers[-1].input, name=f"{stage.name}_pre")
            removed = True
        x = stage(x)
    rebuilt = keras.Model(inp, [act, x], name=f"{model.name}_attribution")
    # The rebuild assumes a chain of stages; check it computes what the model computes.
    probe = np.random.default_rng(0).uniform(0, 255, (2, *model.inputs[0].shape[1:]))
    probe = probe.astype(np.float32)
    want = np.asarray(model(probe, training=False))
    got = np.asarray(rebuilt(probe, training=False)[1])
    if removed:
        got = got / np.maximum(np.linalg.norm(got, axis=-1, keepdims=True), 1e-6)
    if want.shape != got.shape or not np.allclose(want, got, rtol=1e-3, atol=1e-4):
        raise AttributionError(f"model {model.name!r} is not a simple chain of stages (the "
                               "rebuilt model computes something else); attribution needs "
                               "one (a backbone then a head, or a flat stack of layers)")
    return rebuilt, removed


def randomised_copy(model):
    """The same architecture with freshly initialised weights (the randomisation test)."""
    import keras

    clone = keras.models.clone_model(model)
    clone.build(model.inputs[0].shape)
    return clone


# --------------------------------------------------------------------------- baselines
def make_baseline(images: np.ndarray, kind: str = "white") -> np.ndarray:
    """Baseline images x' for integrated gradients (float32, same shape).

    blur: a Gaussian blur (sigma = 1/8 of the side): the patch's colours, no structure;
    black: zeros; white: 255 (a blank slide).
    """
    images = np.asarray(images, np.float32)
    if kind == "black":
        return np.zeros_like(images)
    if kind == "white":
        return np.full_like(images, 255.0)
    if kind != "blur":
        raise AttributionError(f"baseline must be one of {', '.join(BASELINES)}, got {kind!r}")
    from scipy.ndimage import gaussian_filter

    sigma = max(images.shape[1], images.shape[2]) / 8.0
    return gaussian_filter(images, sigma=(0, sigma, sigma, 0), mode="reflect").astype(np.float32)


# --------------------------------------------------------------------------- methods
def integrated_gradients(amodel, images: np.ndarray, dim: int, baseline: str | np.ndarray =
                         "white", steps: int = 64, batch: int = 65) -> tuple[np.ndarray, dict]:
    """Integrated gradients of embedding dimension `dim` (trapezoidal rule).

    Args:
      amodel: `attribution_model(...)[0]`.
      images: (B, H, W, C) float32 pixels as the model takes them ([0, 255]).
      dim: embedding dimension.
      baseline: a `make_baseline` kind, or baseline images of the same shape.
      steps: interpolation intervals (steps + 1 gradient evaluations per patch).
      batch: path points per model call.

    Returns:
      (attributions (B, H, W, C) float32, check) with check = {"sum": (B,) attribution
      sums, "delta": (B,) f(x) - f(x'), "completeness_error": (B,) |sum - delta| /
      max(|delta|, 1e-6)}.
    """
    import tensorflow as tf

    x = np.asarray(images, np.float32)
    x0 = make_baseline(x, baseline) if isinstance(baseline, str) else np.asarray(baseline,
                                                                                  np.float32)
    _check_dim(amodel, dim)
    alphas = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    weights = np.full(steps + 1, 1.0 / steps, np.float32)
    weights[[0, -1]] *= 0.5

    @tf.function(reduce_retracing=True)
    def grads(points):
        with tf.GradientTape() as tape:
            tape.watch(points)
            out = amodel(points, training=False)[1][:, dim]
        return tape.gradient(out, points)

    # All path points of one patch go through the model in batches of `batch` images.
    total = np.zeros_like(x)
    for b in range(len(x)):
        path = x0[b][None] + alphas[:, None, None, None] * (x[b] - x0[b])[None]
        g = np.concatenate([grads(tf.constant(path[i:i + batch])).numpy()
                            for i in range(0, len(path), batch)])
        total[b] = np.tensordot(weights, g, axes=1)
    attributions = (x - x0) * total
    f_x = amodel(tf.constant(x), training=False)[1][:, dim].numpy()
    f_0 = amodel(tf.constant(x0), training=False)[1][:, dim].numpy()
    s = attributions.reshape(len(x), -1).sum(1)
    delta = f_x - f_0
    return attributions, {"sum": s, "delta": delta,
                          "completeness_error": np.abs(s - delta) / np.maximum(np.abs(delta),
                                                                                1e-6)}


def grad_cam(amodel, images: np.ndarray, dim: int) -> np.ndarray:
    """Grad-CAM maps (B, H, W) in [0, 1] (each map scaled by its maximum; 0 where flat)."""
    import tensorflow as tf

    x = tf.constant(np.asarray(images, np.float32))
    _check_dim(amodel, dim)
    with tf.GradientTape() as tape:
        act, emb = amodel(x, training=False)
        out = emb[:, dim]
    grads = tape.gradient(out, act)
    w = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(w * act, axis=-1))[..., None]
    cam = tf.image.resize(cam, x.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(1)
    return (cam / np.where(peak > 0, peak, 1.0)[:, None, None]).astype(np.float32)


def _check_dim(amodel, dim: int) -> None:
    d = int(amodel.outputs[1].shape[-1])
    if not 0 <= dim < d:
        raise AttributionError(f"dimension {dim} out of range for {d}-d embeddings")


def heat(attributions: np.ndarray) -> np.ndarray:
    """(B, H, W) maps in [0, 1] from IG attributions: |sum over channels|, per-map max."""
    m = np.abs(np.asarray(attributions).sum(-1))
    peak = m.reshape(len(m), -1).max(1)
    return m / np.where(peak > 0, peak, 1.0)[:, None, None]


def positive_heat(attributions: np.ndarray) -> np.ndarray:
    """(B, H, W) maps in [0, 1] of the evidence *for* a dimension: the positive part of
    the channel-summed IG attributions (Grad-CAM's ReLU keeps the same), per-map max."""
    m = np.clip(np.asarray(attributions).sum(-1), 0.0, None)
    peak = m.reshape(len(m), -1).max(1)
    return m / np.where(peak > 0, peak, 1.0)[:, None, None]


def maps(amodel, images: np.ndarray, dim: int, method: str = "integrated_gradients",
         baseline: str = "white", steps: int = 64) -> tuple[np.ndarray, dict | None]:
    """(B, H, W) heat maps in [0, 1] of one method, and IG's completeness check."""
    if method == "integrated_gradients":
        attr, check = integrated_gradients(amodel, images, dim, baseline, steps)
        return heat(attr), check
    if method == "grad_cam":
        return grad_cam(amodel, images, dim), None
    raise AttributionError(f"method must be one of {', '.join(METHODS)}, got {method!r}")


# --------------------------------------------------------------------------- checks
def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) Spearman rank correlation between paired maps (B, H, W)."""
    from scipy.stats import spearmanr

    out = []
    for x, y in zip(a, b, strict=True):
        r = spearmanr(x.ravel(), y.ravel()).statistic
        out.append(0.0 if not np.isfinite(r) else float(r))
    return np.asarray(out)


def layer_concentration(heat_maps: np.ndarray, region: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """(B,) mean map value inside `region` over the mean in the rest of the tissue (> 1:
    the map falls on the region more than elsewhere; 1: no preference)."""
    out = []
    for m, r, t in zip(heat_maps, region, tissue, strict=True):
        inside, outside = m[r & t], m[~r & t]
        if inside.size == 0 or outside.size == 0:
            out.append(np.nan)
            continue
        out.append(float(inside.mean() / max(outside.mean(), 1e-12)))
    return np.asarray(out)


# --------------------------------------------------------------------------- figures
def plot_maps(images: np.ndarray, heat_maps: Sequence[np.ndarray], titles: Sequence[str],
              row_labels: Sequence[str], path: str, suptitle: str = "") -> str:
    """Patches (top row) with each method's map overlaid (one row per method); a PNG."""
    from matplotlib.figure import Figure

    from ish_tf.io_utils import atomic_path

    n = len(images)
    rows = 1 + len(heat_maps)
    fig = Figure(figsize=(1.6 * max(n, 1) + 0.8, 1.7 * rows + 0.4), dpi=100)
    axes = fig.subplots(rows, max(n, 1), squeeze=False)
    for j in range(n):
        img = np.clip(images[j], 0, 255).astype(np.uint8)
        axes[0][j].imshow(img)
        axes[0][j].set_title(titles[j], fontsize=7)
        for r, hm in enumerate(heat_maps, start=1):
            axes[r][j].imshow(img)
            axes[r][j].imshow(hm[j], cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    for r in range(rows):
        for j in range(max(n, 1)):
            axes[r][j].set_xticks([])
            axes[r][j].set_yticks([])
        axes[r][0].set_ylabel((["patch"] + list(row_labels))[r], fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# --------------------------------------------------------------------------- report hook
def extreme_patch_maps(records_dir: str, patch_table, gene: str, dim: int, model_path: str,
                       path: str, k: int = 8, steps: int = 64) -> str:
    """The report's extreme-patches figure with a heat map per patch (a second figure).

    Picks the same patches as `ish_tf.evaluate.figures.plot_extreme_patches` (the k
    highest and k lowest values of `dim` among the gene's patches), reads them from the
    records, and shows each under integrated gradients (pre-normalisation, white
    baseline) and Grad-CAM of the model in `model_path` (RUN or a .keras file).

    Returns:
      The caption, with the median completeness error and the mean rank correlation of
      the maps with those of a randomly re-initialised copy of the model.

    Raises:
      AttributionError: the model cannot be attributed, or no chosen patch is found.
    """
    import io

    from PIL import Image

    from ish_tf.evaluate.figures import read_patches

    keys = patch_table.keys
    rows = np.flatnonzero(keys["gene_symbol"].astype(str).to_numpy() == gene)
    if rows.size == 0:
        raise AttributionError(f"{patch_table.source}: no patch of gene {gene!r}")
    order = rows[np.argsort(-patch_table.values[rows, dim], kind="stable")]
    k_top = min(k, (rows.size + 1) // 2)
    chosen = list(order[:k_top]) + list(order[::-1][:min(k, rows.size - k_top)])
    ids, pidx = keys["image_id"].to_numpy(), keys["patch_index"].to_numpy()
    wanted = [(int(ids[r]), int(pidx[r])) for r in chosen]
    found = read_patches(records_dir, gene, set(wanted))
    picked = [(r, w) for r, w in zip(chosen, wanted, strict=True) if w in found]
    if not picked:
        raise AttributionError(f"{records_dir}: none of the chosen patches of {gene!r} is in "
                               "the records")
    model = load_model(model_path)
    amodel, removed = attribution_model(model)
    size = tuple(int(s) for s in model.inputs[0].shape[1:3])
    import tensorflow as tf

    from ish_tf.export.signatures import fit_image

    images = np.stack([fit_image(tf.constant(np.asarray(Image.open(io.BytesIO(found[w]))
                                                        .convert("RGB")), tf.float32),
                                 size[0], size[1], 3).numpy() for _, w in picked])
    ig, check = maps(amodel, images, dim, "integrated_gradients", "white", steps)
    cam, _ = maps(amodel, images, dim, "grad_cam")
    random_model, _ = attribution_model(randomised_copy(model))
    rho_ig = rank_correlation(ig, maps(random_model, images, dim, "integrated_gradients",
                                       "white", steps)[0])
    rho_cam = rank_correlation(cam, maps(random_model, images, dim, "grad_cam")[0])
    titles = [f"{'high' if i < k_top else 'low'} {patch_table.values[r, dim]:.3g}\n{w[0]}/{w[1]}"
              for i, (r, w) in enumerate(picked)]
    plot_maps(images, [ig, cam], titles, ["integrated gradients", "Grad-CAM"], path,
              f"{gene}: dimension {dim}")
    return (f"Attribution maps of dimension {dim} for the same patches of {gene} (highest "
            f"values first, then lowest): integrated gradients on the "
            f"{'pre-normalisation ' if removed else ''}embedding with a white (blank slide) "
            f"baseline "
            f"({steps} steps; median completeness error "
            f"{np.median(check['completeness_error']):.3g}) and Grad-CAM on the last "
            f"convolutional block. Randomisation check: mean Spearman rank correlation with "
            f"the maps of a randomly re-initialised copy {np.mean(rho_ig):.2f} (IG) and "
            f"{np.mean(rho_cam):.2f} (Grad-CAM); low means the maps depend on the trained "
            "weights.")

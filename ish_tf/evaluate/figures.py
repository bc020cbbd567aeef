"""Figures of the evaluation stage (PNG, matplotlib's Agg renderer, no display needed).

Each function draws one figure to `path` and returns its caption, which says what
the figure shows and how it was made (e.g. which 2-D projection), ready for the
HTML report. Figures are built on `matplotlib.figure.Figure` directly rather than
pyplot, so no global backend is switched and nothing is left open.
"""

from __future__ import annotations

import importlib.util
import io
import os

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ish_tf.data.embeddings import EmbeddingTable
from ish_tf.io_utils import atomic_path

MAP_METHODS: tuple[str, ...] = ("auto", "umap", "tsne", "pca")
#: t-SNE is used up to this many points when UMAP is not installed; PCA beyond.
TSNE_MAX_POINTS = 5000
#: t-SNE optimisation steps (scikit-learn's default; at least 250).
TSNE_MAX_ITER = 1000
#: Categories drawn in their own colour on a map; rarer ones are pooled as "other".
MAX_MAP_CATEGORIES = 12
_OTHER_COLOUR = "#bbbbbb"


class FigureError(ValueError):
    """Inputs a figure cannot be drawn from; the message names the argument or column."""


def _save(fig: Figure, path: str) -> None:
    """Renders with Agg and writes the PNG atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi, bbox_inches="tight")


# --------------------------------------------------------------------------- 2-D map
def _project(values: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, str]:
    """(N, 2) coordinates and the name of the method actually used."""
    n = values.shape[0]
    if method == "auto":
        if importlib.util.find_spec("umap") is not None and n >= 4:
            method = "umap"
        elif 4 <= n <= TSNE_MAX_POINTS:
            method = "tsne"
        else:
            method = "pca"
    if method == "umap":
        if importlib.util.find_spec("umap") is None:
            raise FigureError("method='umap' needs the optional package umap-learn: "
                              "pip install 'ish_tf[umap]'")
        import umap

        coords = umap.UMAP(n_components=2, random_state=seed,
                           n_neighbors=min(15, max(2, n - 1))).fit_transform(values)
        return np.asarray(coords, dtype=np.float64), "UMAP"
    if method == "tsne":
        from sklearn.manifold import TSNE

        if n < 4:
            raise FigureError(f"t-SNE needs at least 4 points, got {n}")
        # Perplexity must stay below N; a third of N keeps tiny maps meaningful.
        perplexity = float(min(30.0, max(1.0, (n - 1) / 3.0)))
        coords = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
                      max_iter=TSNE_MAX_ITER).fit_transform(values)
        return coords, f"t-SNE (perplexity {perplexity:g})"
    if method == "pca":
        from sklearn.decomposition import PCA

        x = values if values.shape[1] >= 2 else np.hstack([values, np.zeros((n, 1))])
        pca = PCA(n_components=2, random_state=seed).fit(x)
        explained = pca.explained_variance_ratio_.sum() if n > 1 else 1.0
        return pca.transform(x), f"PCA ({100 * explained:.0f}% of variance)"
    raise FigureError(f"method must be one of {', '.join(MAP_METHODS)}, got {method!r}")


def plot_embedding_map(values, labels: pd.Series, title: str, path: str, method: str = "auto",
                       seed: int = 0) -> str:
    """2-D map of embeddings coloured by an annotation.

    Categorical labels get one colour per category (the `MAX_MAP_CATEGORIES - 1`
    most frequent; the rest pooled as "other", missing as "NA", both grey); numeric
    labels with many distinct values get a colour scale.

    Args:
      values: (N, D) embeddings (e.g. one row per gene).
      labels: (N,) annotation per row, aligned by position; its name is the legend title.
      title: figure title.
      path: PNG to write (atomically).
      method: "auto" (UMAP when umap-learn is importable, else t-SNE for
        N ≤ 5,000, else PCA), "umap", "tsne" or "pca".
      seed: random state of the projection.

    Returns:
      The caption, naming the projection used.

    Raises:
      FigureError: mismatched lengths, too few points, an unknown or unavailable method.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise FigureError(f"values: expected (N, D) with N >= 2, got shape {x.shape}")
    labels = pd.Series(labels).reset_index(drop=True)
    if len(labels) != x.shape[0]:
        raise FigureError(f"labels: {len(labels)} values for {x.shape[0]} embeddings")
    name = str(labels.name) if labels.name is not None else "label"
    coords, used = _project(x, method, seed)

    fig = Figure(figsize=(7.5, 6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    numeric = pd.api.types.is_numeric_dtype(labels) and labels.nunique() > MAX_MAP_CATEGORIES
    if numeric:
        ok = labels.notna().to_numpy()
        ax.scatter(coords[~ok, 0], coords[~ok, 1], s=10, c=_OTHER_COLOUR, label="NA")
        sc = ax.scatter(coords[ok, 0], coords[ok, 1], s=10, c=labels[ok].to_numpy(float),
                        cmap="viridis")
        fig.colorbar(sc, ax=ax, label=name)
        colouring = f"coloured by {name} (colour scale)"
    else:
        text = labels.astype("string").fillna("NA")
        counts = text[text != "NA"].value_counts()
        shown = list(counts.index[:MAX_MAP_CATEGORIES - 1])
        groups = text.where(text.isin(shown) | (text == "NA"), "other")
        palette = _colours(len(shown))
        for cat, colour in [*zip(shown, palette, strict=True), ("other", _OTHER_COLOUR),
                            ("NA", "#dddddd")]:
            sel = (groups == cat).to_numpy()
            if sel.any():
                ax.scatter(coords[sel, 0], coords[sel, 1], s=10, color=colour,
                           label=f"{cat} ({int(sel.sum())})",
                           zorder=1 if cat in ("other", "NA") else 2)
        ax.legend(title=name, fontsize=7, title_fontsize=8, loc="center left",
                  bbox_to_anchor=(1.01, 0.5), frameon=False, markerscale=1.5)
        pooled = len(counts) - len(shown)
        colouring = (f"coloured by {name} ({len(shown)} categories"
                     + (f"; {pooled} rarer ones pooled as 'other'" if pooled > 0 else "") + ")")
    ax.set_title(title)
    ax.set_xlabel(f"{used.split(' ')[0]} 1")
    ax.set_ylabel(f"{used.split(' ')[0]} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    _save(fig, path)
    return (f"{title}: {used} map of {x.shape[0]} embeddings ({x.shape[1]} dimensions), "
            f"{colouring}.")


def _colours(k: int) -> list:
    """k distinct colours: tab10, then tab20 for more."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]


# --------------------------------------------------------------------------- bars
def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise FigureError(f"{what}: missing column(s) {', '.join(repr(m) for m in missing)}; "
                          f"columns are {', '.join(map(str, df.columns))}")
    if df.empty:
        raise FigureError(f"{what}: no rows to plot")


def _grouped_bars(ax, groups: list[str], series: list[str], value, width_total: float = 0.8):
    """Draws bars for every (group, series); returns the bar x-centres per (group, series)."""
    colours = _colours(len(series))
    w = width_total / max(len(series), 1)
    centres = {}
    for j, s in enumerate(series):
        xs, hs = [], []
        for i, g in enumerate(groups):
            v = value(g, s)
            x = i - width_total / 2 + (j + 0.5) * w
            centres[(g, s)] = (x, w)
            if v is not None and np.isfinite(v):
                xs.append(x)
                hs.append(v)
        ax.bar(xs, hs, width=w * 0.95, color=colours[j], label=s)
    ax.set_xticks(range(len(groups)))
    return centres


def plot_auc_bars(results: pd.DataFrame, path: str) -> str:
    """Bar charts of AUC per annotation category and embedding, one panel per annotation.

    Args:
      results: one row per (annotation, category, embedding) with columns annotation,
        category, auc, embedding.
      path: PNG to write.

    Returns:
      The caption.

    Raises:
      FigureError: a missing column or no rows.
    """
    from ish_tf.evaluate.annotations import category_label

    _require(results, ("annotation", "category", "auc", "embedding"), "AUC results")
    annotations = list(dict.fromkeys(results["annotation"].astype(str)))
    embeddings = list(dict.fromkeys(results["embedding"].astype(str)))
    df = results.assign(annotation=results["annotation"].astype(str),
                        category=results["category"].astype(str),
                        embedding=results["embedding"].astype(str))
    sizes = [df.loc[df["annotation"] == a, "category"].nunique() for a in annotations]
    fig = Figure(figsize=(max(6.0, 0.9 * sum(sizes) + 2.5), 4.2), dpi=100)
    axes = fig.subplots(1, len(annotations), squeeze=False,
                        gridspec_kw={"width_ratios": [max(s, 1) for s in sizes]})[0]
    for ax, a in zip(axes, annotations, strict=True):
        sub = df[df["annotation"] == a]
        cats = list(dict.fromkeys(sub["category"]))
        lookup = sub.groupby(["category", "embedding"])["auc"].mean()
        _grouped_bars(ax, cats, embeddings, lambda c, e, lk=lookup: lk.get((c, e)))
        ax.axhline(0.5, color="k", lw=0.8, ls="--", label="chance (0.5)")
        ax.set_xticklabels(cats, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(category_label(a), fontsize=10)
    axes[0].set_ylabel("AUC")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 5), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.08))
    _save(fig, path)
    return (f"AUC per category for {len(annotations)} annotation(s) "
            f"({', '.join(category_label(a) for a in annotations)}) and {len(embeddings)} embedding(s) "
            f"({', '.join(embeddings)}); dashed line: chance (AUC 0.5).")


def plot_reid_bars(reid_df: pd.DataFrame, path: str, column: str = "rank1") -> str:
    """Rank-1 bars per candidate set and embedding, with each bar's exact chance marked.

    Args:
      reid_df: output of `reid.reid_table` (columns embedding, candidates, rank1,
        chance, ...) or of `evaluate_reid` (then one unnamed embedding).
      path: PNG to write.
      column: "rank1" (all queries; chance from "chance") or "rank1_answerable"
        (chance from "chance_answerable").

    Returns:
      The caption.

    Raises:
      FigureError: a missing column, no rows, or an unknown `column`.
    """
    chance_col = {"rank1": "chance", "rank1_answerable": "chance_answerable"}.get(column)
    if chance_col is None:
        raise FigureError(f"column must be 'rank1' or 'rank1_answerable', got {column!r}")
    df = reid_df if "embedding" in reid_df.columns else reid_df.assign(embedding="embedding")
    _require(df, ("candidates", column, chance_col), "re-identification results")
    df = df.assign(embedding=df["embedding"].astype(str))
    sets = list(dict.fromkeys(df["candidates"].astype(str)))
    embeddings = list(dict.fromkeys(df["embedding"]))
    # Percentages on the axis and the bar labels alike.
    value = 100 * df.set_index(["candidates", "embedding"])[column]
    chance = 100 * df.set_index(["candidates", "embedding"])[chance_col]

    fig = Figure(figsize=(max(5.5, 1.2 * len(sets) * max(len(embeddings), 2) * 0.6 + 2), 4.2),
                 dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    centres = _grouped_bars(ax, sets, embeddings, lambda s, e: value.get((s, e)))
    top = 0.0
    for (s, e), (x, w) in centres.items():
        v, c = value.get((s, e)), chance.get((s, e))
        if v is not None and np.isfinite(v):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
            top = max(top, v)
        if c is not None and np.isfinite(c):
            ax.hlines(c, x - w / 2, x + w / 2, colors="k", lw=2,
                      label="chance" if (s, e) == next(iter(centres)) else None)
            top = max(top, c)
    ax.set_xticklabels([s.replace("_", " ") for s in sets])
    ax.set_ylabel("rank-1 (%" + (", answerable queries)" if column != "rank1" else ")"))
    ax.set_ylim(0, min(100.0, top * 1.2 + 2) if top > 0 else 100.0)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    over = "answerable queries" if column != "rank1" else "all queries"
    return (f"Gene re-identification: rank-1 (% of {over}) per candidate set "
            f"for {len(embeddings)} embedding(s) ({', '.join(embeddings)}); black ticks mark "
            "the exact chance level of each bar.")


# --------------------------------------------------------------------------- patches
def read_patches(records_dir: str, gene: str, wanted: set[tuple[int, int]]) -> dict:
    """(image_id, patch_index) -> encoded bytes for the wanted patches of one gene.

    Uses each shard's (offset, count) of the gene from the index when present, so
    only the gene's records are parsed; otherwise scans the shards listing the gene.
    """
    import tensorflow as tf

    from ish_tf.data import records
    from ish_tf.data.shards import index_path, load_index

    index = load_index(records_dir)
    shards = [s for s in index["shards"] if s.get("genes", {}).get(gene, 0) > 0]
    if not shards:
        raise FigureError(f"{index_path(records_dir)}: no completed shard holds gene "
                          f"{gene!r}")
    found: dict[tuple[int, int], bytes] = {}
    keys = ("image/encoded", "image_id", "patch_index", "gene_symbol")
    for s in shards:
        path = os.path.join(records_dir, s["file"])
        ds = tf.data.TFRecordDataset(path, compression_type=s.get("compression") or "")
        offset = (s.get("gene_offsets") or {}).get(gene)
        if offset is not None:
            ds = ds.skip(int(offset)).take(int(s["genes"][gene]))
        for serialized in ds:
            ex = records.parse_example(serialized, keys)
            key = (int(ex["image_id"]), int(ex["patch_index"]))
            if ex["gene_symbol"].numpy().decode() == gene and key in wanted:
                found[key] = ex["image/encoded"].numpy()
        if len(found) == len(wanted):
            break
    return found


def plot_extreme_patches(records_dir: str, patch_table: EmbeddingTable, gene: str, dim: int,
                         path: str, k: int = 8) -> str:
    """The k patches of a gene that most and least activate one embedding dimension.

    The paper's Fig 3: top row = highest values of dimension `dim` among the gene's
    patches, bottom row = lowest; each thumbnail is labelled with its value and
    image_id/patch_index. Patches are read back from the TFRecord shards.

    Args:
      records_dir: records directory written by `bin/extract` (with index.json).
      patch_table: patch-level embeddings with keys image_id, patch_index, gene_symbol.
      gene: gene symbol.
      dim: embedding dimension, 0 <= dim < D.
      path: PNG to write.
      k: thumbnails per row (fewer when the gene has fewer than 2k patches: the two
        rows then split the gene's patches without overlap).

    Returns:
      The caption.

    Raises:
      FigureError: a missing key column, an unknown gene, dim out of range, k < 1, or
        none of the chosen patches found in the records.
    """
    from PIL import Image

    keys = patch_table.keys
    missing = [c for c in ("image_id", "patch_index", "gene_symbol") if c not in keys.columns]
    if missing:
        raise FigureError(f"{patch_table.source or 'patch table'}: missing key column(s) "
                          f"{', '.join(repr(m) for m in missing)}")
    if not 0 <= dim < patch_table.dim:
        raise FigureError(f"dim {dim} out of range for {patch_table.dim}-d embeddings")
    if k < 1:
        raise FigureError(f"k must be >= 1, got {k}")
    rows = np.flatnonzero(keys["gene_symbol"].astype(str).to_numpy() == gene)
    if rows.size == 0:
        raise FigureError(f"{patch_table.source or 'patch table'}: no patch of gene {gene!r}")
    vals = patch_table.values[rows, dim]
    order = rows[np.argsort(-vals, kind="stable")]  # highest first
    k_top = min(k, (rows.size + 1) // 2)
    k_bottom = min(k, rows.size - k_top)
    top = order[:k_top]
    bottom = order[::-1][:k_bottom]  # lowest first
    ids = keys["image_id"].to_numpy()
    pidx = keys["patch_index"].to_numpy()
    wanted = {(int(ids[r]), int(pidx[r])) for r in np.concatenate([top, bottom])}
    found = read_patches(records_dir, gene, wanted)
    if not found:
        raise FigureError(f"{records_dir}: none of the {len(wanted)} chosen patches of {gene!r} "
                          "is in the records (do the embeddings come from these records?)")

    ncols = max(k_top, k_bottom, 1)
    fig = Figure(figsize=(1.6 * ncols + 0.8, 4.0), dpi=100)
    axes = fig.subplots(2, ncols, squeeze=False)
    for row_i, (label, chosen) in enumerate([("highest", top), ("lowest", bottom)]):
        for j in range(ncols):
            ax = axes[row_i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(chosen):
                ax.axis("off")
                continue
            r = chosen[j]
            key = (int(ids[r]), int(pidx[r]))
            if key in found:
                img = Image.open(io.BytesIO(found[key])).convert("RGB")
                ax.imshow(np.asarray(img))
            else:
                ax.text(0.5, 0.5, "not in\nrecords", ha="center", va="center", fontsize=8)
            ax.set_title(f"{patch_table.values[r, dim]:.3g}\n{key[0]}/{key[1]}", fontsize=7)
        axes[row_i][0].set_ylabel(label, fontsize=9)
    fig.suptitle(f"{gene}: dimension {dim}", fontsize=10)
    _save(fig, path)
    n_missing = len(wanted) - len(found)
    return (f"Patches of {gene} ({rows.size} in the table) with the highest (top row) and "
            f"lowest (bottom row) values of embedding dimension {dim}; titles give the value "
            f"and image_id/patch_index."
            + (f" {n_missing} chosen patch(es) were not found in the records." if n_missing
               else ""))

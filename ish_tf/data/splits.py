"""Train/validation/test splits that hold: assigned from each image's outcome, and checked.

Splitting genes (or donors) before extraction gives each split its share of *genes*, not
of *patches*: genes whose images yield few or no patches (too small, no tissue, faint
masks) can leave a split empty. With `split_assign="balanced"`, `bin/extract` first
counts the patches each image would give (`count_image_patches`: mask, from the mask cache
that the extraction itself then reuses, and window sampling, without cropping or
encoding), then assigns whole genes (or donors) to splits so that each split gets close to
its requested share of patches (`balance_splits`). The assignment is written to
`OUT/splits.csv` (item, split, planned patches) and read back by a resumed run, which
then skips the counting. After extraction, `check_splits` refuses (or, allowed, warns
about) a requested split that holds no patches, naming it and the counts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ish_tf.io_utils import atomic_path

if TYPE_CHECKING:
    from ish_tf.data.patches import ExtractConfig

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_ASSIGN: tuple[str, ...] = ("plan", "balanced")
SPLITS_NAME = "splits.csv"
SPLITS_COLUMNS: tuple[str, ...] = ("item", "split", "planned_patches")


class SplitError(ValueError):
    """A requested split that cannot be filled; the message names it and the counts."""


def count_image_patches(task: tuple) -> tuple[int, int]:
    """(image_id, number of patches) the extraction of one image would give.

    The same steps as `patch_sampling.extract_image_patches` up to the sampled corners
    (read, size check, mask through the cache, seeded sampling), so the count is exactly
    the number of patches the extraction writes; an image that cannot be read counts 0.

    Args:
      task: (image path, image id, ExtractConfig, mask directory or None).
    """
    from ish_tf.data import patch_sampling as ps
    from ish_tf.data.segment import load_or_compute_mask

    path, image_id, cfg, mask_dir = task
    try:
        rgb = ps.read_rgb_retrying(path, downsample=cfg.read_downsample,
                                   max_pixels=cfg.max_pixels)
    except ps.ImageIOError:
        raise
    except Exception:  # unreadable images yield nothing; the extraction reports why
        return image_id, 0
    h, w = rgb.shape[:2]
    if h < cfg.source_size or w < cfg.source_size:
        return image_id, 0
    try:
        mask, _ = load_or_compute_mask(rgb, image_id, cfg.mask, mask_dir)
    except Exception:
        return image_id, 0
    if not mask.any():
        return image_id, 0
    corners = ps.sample_patches(mask, n=cfg.patches_per_image, size=cfg.source_size,
                                min_fraction=cfg.min_fraction, max_tries=cfg.max_tries,
                                rng=ps.image_rng(cfg.seed, image_id))
    return image_id, len(corners)


def balance_splits(counts: Mapping[str, int], fractions: Sequence[float],
                   seed: int = 0) -> dict[str, str]:
    """Assigns whole items (genes or donors) to splits by their patch counts.

    Items with patches are taken in a seeded random order. First every split with a
    non-zero fraction receives one item, the one whose count is closest to the split's
    target (smallest split first), so none is left empty while items remain; then each
    further item goes to the split furthest below its target (target minus patches so
    far). Items without patches are spread over the splits by the same rule on item
    counts (they add no records; they keep the vocabulary's split column filled).

    Args:
      counts: item -> patches it gives.
      fractions: (train, validation, test) shares, normalised to sum 1.
      seed: seed of the item order.

    Returns:
      item -> "train" | "validation" | "test".
    """
    fr = np.asarray(fractions, dtype=np.float64)
    fr = fr / fr.sum()
    items = sorted(counts)
    order = [items[i] for i in np.random.default_rng(seed).permutation(len(items))]
    full = [k for k in order if counts[k] > 0]
    empty = [k for k in order if counts[k] <= 0]
    total = float(sum(counts[k] for k in full))
    target = fr * total
    have = np.zeros(3)
    out: dict[str, str] = {}
    for s in sorted((i for i in range(3) if fr[i] > 0), key=lambda i: (fr[i], -i)):
        if not full:
            break
        pick = min(full, key=lambda k: abs(counts[k] - target[s]))
        full.remove(pick)
        out[pick] = SPLITS[s]
        have[s] += counts[pick]
    for k in full:
        s = int(np.argmax(np.where(fr > 0, target - have, -np.inf)))
        out[k] = SPLITS[s]
        have[s] += counts[k]
    n_have = np.zeros(3)
    for k in out:
        n_have[SPLITS.index(out[k])] += 1
    n_target = fr * len(items)
    for k in empty:
        s = int(np.argmax(np.where(fr > 0, n_target - n_have, -np.inf)))
        out[k] = SPLITS[s]
        n_have[s] += 1
    return out


def splits_path(out_dir: str) -> str:
    return os.path.join(out_dir, SPLITS_NAME)


def write_assignment(out_dir: str, assignment: Mapping[str, str],
                     counts: Mapping[str, int]) -> str:
    """Writes OUT/splits.csv (item, split, planned_patches), atomically; returns its path."""
    path = splits_path(out_dir)
    df = pd.DataFrame([{"item": k, "split": assignment[k], "planned_patches": int(counts.get(k, 0))}
                       for k in sorted(assignment)], columns=list(SPLITS_COLUMNS))
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def read_assignment(out_dir: str, items: Sequence[str]) -> dict[str, str] | None:
    """The assignment in OUT/splits.csv if it covers exactly `items`, else None.

    Raises:
      SplitError: the file exists but is malformed (names the file and the problem).
    """
    path = splits_path(out_dir)
    if not os.path.exists(path):
        return None
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SplitError(f"{path}: unreadable split assignment ({e}); remove it to recount") from e
    if not {"item", "split"} <= set(df.columns):
        raise SplitError(f"{path}: needs columns item and split; remove it to recount")
    bad = df[~df["split"].isin(SPLITS)]
    if len(bad):
        raise SplitError(f"{path} line {bad.index[0] + 2}: split {bad['split'].iloc[0]!r} is "
                         f"not one of {', '.join(SPLITS)}")
    if set(df["item"]) != set(items):
        return None
    return dict(zip(df["item"], df["split"], strict=True))


def check_splits(patches: Mapping[str, int], fractions: Sequence[float], *,
                 allow_empty: bool = False, hint: str = "") -> list[str]:
    """Refuses a requested split that holds no patches; reports each split's share.

    Args:
      patches: split -> patches written.
      fractions: requested (train, validation, test) shares.
      allow_empty: warn instead of raising.
      hint: what to do about it, appended to the message.

    Returns:
      Lines describing each requested split's share (and the warning where allowed).

    Raises:
      SplitError: a split with a non-zero fraction holds no patches (unless allowed).
    """
    fr = np.asarray(fractions, dtype=np.float64)
    fr = fr / fr.sum()
    total = sum(int(patches.get(s, 0)) for s in SPLITS)
    lines = [f"{s}: {int(patches.get(s, 0))} patches ({100 * int(patches.get(s, 0)) / max(total, 1):.1f}%"
             f", requested {100 * fr[i]:.0f}%)" for i, s in enumerate(SPLITS) if fr[i] > 0]
    empty = [s for i, s in enumerate(SPLITS) if fr[i] > 0 and int(patches.get(s, 0)) == 0]
    if empty:
        message = (f"split(s) {', '.join(empty)} requested ({', '.join(lines)}) but hold no "
                   f"patches{hint}")
        if not allow_empty:
            raise SplitError(message)
        lines.append("warning: " + message)
    return lines


def split_items(df: pd.DataFrame, split_by: str) -> pd.Series:
    """The manifest column splits are made of: gene_symbol or donor_id, as str."""
    return df["gene_symbol" if split_by == "gene" else "donor_id"].astype(str)


def count_patches(df: pd.DataFrame, cfg: ExtractConfig, mask_dir: str | None,
                  image_paths: Sequence[str], workers: int = 1,
                  progress_enabled: bool | None = None) -> dict[str, int]:
    """Patches each item (gene or donor) of `df` would give: the counting pass.

    Masks are computed into `mask_dir` (the extraction's cache), so the extraction that
    follows does not compute them again.

    Returns:
      item -> patches.
    """
    import multiprocessing as mp

    from ish_tf.data.patches import image_config
    from ish_tf.io_utils import Progress

    tasks = [(p, int(row.image_id), image_config(cfg, row), mask_dir)
             for p, row in zip(image_paths, df.itertuples(index=False), strict=True)]
    per_image: dict[int, int] = {}
    pool: Any = None
    if workers > 1 and len(tasks) > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ctx.Pool(workers)
    try:
        results = pool.imap(count_image_patches, tasks) if pool else map(count_image_patches, tasks)
        with Progress(len(tasks), "count patches", progress_enabled) as bar:
            for image_id, n in results:
                per_image[image_id] = n
                bar.update()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    items = split_items(df, cfg.split_by)
    counts = {k: 0 for k in items}
    for k, image_id in zip(items, df["image_id"].astype(int), strict=True):
        counts[k] += per_image[image_id]
    return counts

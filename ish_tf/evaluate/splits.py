"""Which rows of an embedding table are scored: the `--splits` choice of `bin/evaluate`.

Tables written by `bin/embed` carry the record split (train, validation, test) of every
row. Scoring training genes measures memory, not generalisation, so by default only the
held-out splits (every split but "train") are scored where a `split` column exists; the
choice is stated in the output. `--splits=all` scores every row, `--splits=a,b` those
splits. A table without a `split` column (published tables, other tools) is used whole.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from ish_tf.data.embeddings import EmbeddingTable

#: The split a model was trained on; every other split counts as held out.
TRAIN_SPLIT = "train"
ALL = "all"


class SplitSelectionError(ValueError):
    """A --splits choice a table cannot meet; the message names the table and its splits."""


@dataclasses.dataclass
class SplitChoice:
    """What `select_splits` kept of one table.

    Attributes:
      splits: the splits kept, sorted ("" entries never; empty when no split column).
      how: "default: held-out splits (every split but train)", "--splits=all",
        "--splits=<list>" or "no split column: every row".
      rows, rows_total: rows kept and rows of the table.
      per_split: split -> (rows, distinct genes) of the kept rows.
    """

    splits: tuple[str, ...]
    how: str
    rows: int
    rows_total: int
    per_split: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """One line, e.g. "test, validation (default: held-out splits ...; 18 of 82 rows)"."""
        what = ", ".join(self.splits) if self.splits else "every row"
        return f"{what} ({self.how}; {self.rows} of {self.rows_total} rows)"

    def small_splits(self) -> list[str]:
        """Kept splits with fewer than 2 genes or 2 rows, as "test: 1 gene, 2 rows"."""
        return [f"{s}: {g} gene{'s' if g != 1 else ''}, {r} row{'s' if r != 1 else ''}"
                for s, (r, g) in self.per_split.items() if g < 2 or r < 2]


def select_splits(table: EmbeddingTable, splits: tuple[str, ...] = (),
                  name: str = "embedding") -> tuple[EmbeddingTable, SplitChoice]:
    """The rows of `table` to score.

    Args:
      table: an embedding table (a `split` key column or none).
      splits: () = default (held-out splits where a split column exists), ("all",) =
        every row, else the splits to keep.
      name: the embedding's name, for messages.

    Returns:
      (the kept rows, a `SplitChoice` saying which and why).

    Raises:
      SplitSelectionError: named splits without a split column, a named split the table
        lacks, or (default) no held-out row.
    """
    n = len(table)
    splits = tuple(s for s in splits if s)
    has = "split" in table.keys.columns
    if not has or splits == (ALL,):
        if not has and splits and splits != (ALL,):
            raise SplitSelectionError(
                f"{table.source or name}: embedding '{name}' has no 'split' column, so "
                f"--splits={','.join(splits)} cannot be applied; use --splits=all")
        how = "no split column: every row" if not has else "--splits=all"
        return table, SplitChoice((), how, n, n, _per_split(table, None))
    values = table.keys["split"].astype("string").fillna("")
    present = sorted(v for v in values.unique() if v)
    if splits:
        missing = [s for s in splits if s not in present]
        if missing:
            raise SplitSelectionError(
                f"{table.source or name}: embedding '{name}' has no rows of split(s) "
                f"{', '.join(missing)}; its splits are {', '.join(present) or 'none'}")
        keep_splits, how = tuple(sorted(splits)), f"--splits={','.join(splits)}"
    else:
        keep_splits = tuple(s for s in present if s != TRAIN_SPLIT)
        how = "default: held-out splits (every split but train)"
        if not keep_splits:
            raise SplitSelectionError(
                f"{table.source or name}: embedding '{name}' has no held-out rows (its "
                f"splits are {', '.join(present) or 'none'}); genes seen in training "
                "measure memory, not generalisation: pass --splits=train (or --splits=all) "
                "to score them anyway")
    keep = values.isin(keep_splits).to_numpy()
    kept = EmbeddingTable(table.keys[keep].reset_index(drop=True), table.values[keep],
                          table.source)
    return kept, SplitChoice(keep_splits, how, int(keep.sum()), n,
                             _per_split(kept, "split"))


def _per_split(table: EmbeddingTable, column: str | None) -> dict[str, tuple[int, int]]:
    keys = table.keys
    genes = (keys["gene_symbol"].astype(str) if "gene_symbol" in keys.columns
             else pd.Series(np.arange(len(keys))).astype(str))
    if column is None:
        return {ALL: (len(keys), int(genes.nunique()))}
    out = {}
    for split, rows in keys.groupby(column, sort=True).groups.items():
        out[str(split)] = (len(rows), int(genes.loc[rows].nunique()))
    return out

"""Zeng et al. 2012 (Cell) Table S2: expert annotations of ~1,000 genes in human neocortex.

Sheet `Final1000New`, header on the second row (the first row groups columns).
Annotation categories built from it:

- `pattern`: `pattern description for Fig 2` (widespread, laminar, scattered, sparse,
  ND = not determined; ND is kept as its own group).
- `level_description`: `level description for Fig 2` (high, medium, low).
- `level`: the first column named `Level` (human V1: -, +, ..., +++++).
- `layer_marker` and `celltype_marker`: `Cortical marker (human)`, whose entries can
  hold several markers joined by "/", "+" or " or " (e.g. "layer 2/3/6",
  "interneuron/layer5/6", "interneuron or VEC"). Layer tokens become "layer N"
  (sub-layers 4c, 5a, 6b fold into their layer); other tokens are cell types
  (interneuron, astrocyte, oligodendrocyte, VEC); a trailing "?" is dropped, and the
  words "others" and "laminar" (not a cell type) are ignored. Every gene of the
  table is a candidate negative for the marker categories (no entry = not a marker).
"""

from __future__ import annotations

import os
import re

import pandas as pd

from ish_tf.evaluate.annotations import AnnotationError, Annotations, from_long

SHEET = "Final1000New"
COLUMNS: dict[str, str] = {
    "Gene symbol": "gene_symbol",
    "Entrez Gene ID": "entrez_id",
    "pattern description for Fig 2": "pattern",
    "level description for Fig 2": "level_description",
    "Level": "level",
    "Cortical marker (human)": "cortical_marker",
}
CATEGORIES: tuple[str, ...] = ("pattern", "level_description", "level", "layer_marker",
                               "celltype_marker")
_SPLIT = re.compile(r"/|\+|\bor\b")
_LAYER = re.compile(r"^(?:layer)?\s*([1-6])[a-c]?$")
_IGNORED = {"others", "laminar", ""}


def parse_cortical_marker(text: object) -> tuple[list[str], list[str]]:
    """Splits one `Cortical marker (human)` entry into layer and cell-type markers.

    Args:
      text: the cell value, e.g. "interneuron/layer5/6" or NaN.

    Returns:
      (layers, cell_types), e.g. (["layer 5", "layer 6"], ["interneuron"]); sorted,
      without repeats.
    """
    if text is None or (isinstance(text, float) and pd.isna(text)) or pd.isna(text):
        return [], []
    layers, cells = set(), set()
    for raw in _SPLIT.split(str(text)):
        token = raw.strip().rstrip("?").strip()
        low = token.lower()
        m = _LAYER.match(low)
        if m:
            layers.add(f"layer {m.group(1)}")
        elif low not in _IGNORED:
            # Acronyms such as VEC keep their case; words are lower case.
            cells.add(token if token.isupper() else low)
    return sorted(layers), sorted(cells)


def read_zeng_table(path: str) -> pd.DataFrame:
    """Reads Table S2 into tidy columns.

    Args:
      path: the .xlsx file.

    Returns:
      Columns gene_symbol, entrez_id (Int64), pattern, level_description, level,
      cortical_marker; one row per gene.

    Raises:
      AnnotationError: the file or sheet is missing, or a needed column is absent
        (the message names the column and the sheet).
    """
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: Zeng table not found")
    try:
        raw = pd.read_excel(path, sheet_name=SHEET, header=1)
    except ValueError as e:
        raise AnnotationError(f"{path}: cannot read sheet '{SHEET}' ({e})") from e
    # pandas names repeated headers "Level", "Level.1", ...; the first is human V1.
    missing = [c for c in COLUMNS if c not in raw.columns]
    if missing:
        raise AnnotationError(
            f"{path}: sheet '{SHEET}' lacks column(s) {', '.join(repr(m) for m in missing)} "
            f"in its second row (the header)")
    out = raw[list(COLUMNS)].rename(columns=COLUMNS)
    out = out[out["gene_symbol"].notna() | out["entrez_id"].notna()].reset_index(drop=True)
    out["entrez_id"] = pd.to_numeric(out["entrez_id"], errors="coerce").astype("Int64")
    for col in ("gene_symbol", "pattern", "level_description", "level", "cortical_marker"):
        out[col] = out[col].astype("string").str.strip()
    return out


def zeng_annotations(table: pd.DataFrame, source: str = "zeng2012_table_s2.xlsx",
                     categories: tuple[str, ...] = CATEGORIES) -> Annotations:
    """Builds the binary groups of every category from a tidy Zeng table.

    Args:
      table: output of `read_zeng_table`.
      source: file name for messages.
      categories: which of CATEGORIES to build.

    Returns:
      Annotations with categories pattern, level_description, level, layer_marker and
      celltype_marker.

    Raises:
      AnnotationError: an unknown category is requested.
    """
    unknown = [c for c in categories if c not in CATEGORIES]
    if unknown:
        raise AnnotationError(f"unknown Zeng categories {unknown}; choose from {CATEGORIES}")
    keys = ["gene_symbol", "entrez_id"]
    parts, universes = [], {}
    for cat in ("pattern", "level_description", "level"):
        if cat not in categories:
            continue
        has = table[cat].notna() & (table[cat] != "")
        part = table.loc[has, keys].copy()
        part["annotation"] = table.loc[has, cat].to_numpy()
        part["category"] = cat
        parts.append(part)
        universes[cat] = table.loc[has, keys]
    parsed = table["cortical_marker"].map(parse_cortical_marker)
    for cat, which in (("layer_marker", 0), ("celltype_marker", 1)):
        if cat not in categories:
            continue
        rows = [(i, name) for i, pair in enumerate(parsed) for name in pair[which]]
        part = table.iloc[[i for i, _ in rows]][keys].copy()
        part["annotation"] = [name for _, name in rows]
        part["category"] = cat
        parts.append(part)
        universes[cat] = table[keys]
    return from_long(pd.concat(parts, ignore_index=True), source, universes)


def load_zeng(path: str, categories: tuple[str, ...] = CATEGORIES) -> Annotations:
    """Reads Table S2 and builds its annotation groups (see module docstring)."""
    return zeng_annotations(read_zeng_table(path), source=path, categories=categories)

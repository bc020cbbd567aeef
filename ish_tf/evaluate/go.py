"""Gene Ontology groups from a GAF 2.x annotation file, optionally propagated up an OBO.

GAF 2.x is tab-separated with 17 columns and "!" comment lines. We use column 1 (DB),
2 (DB object id), 3 (symbol), 4 (qualifier), 5 (GO id), 7 (evidence code) and 9
(aspect: P, F, C). Rows qualified with NOT are dropped. When DB is NCBIGene/EntrezGene
the object id is an Entrez id, so embeddings can join by entrez_id as well as symbol.

With an OBO file, every annotation is also given to all `is_a` ancestors of its term
(the true-path rule), so a gene in "GABAergic synaptic transmission" also counts for
"synaptic transmission". Group-size bounds (default 40..200 genes) apply after the
genes are matched to an embedding (`ScoringConfig.size_bounds["go"]`).
"""

from __future__ import annotations

import gzip
import os

import pandas as pd

from ish_tf.evaluate.annotations import AnnotationError, Annotations, from_long

GAF_COLUMNS: tuple[str, ...] = (
    "db", "db_object_id", "gene_symbol", "qualifier", "go_id", "reference", "evidence",
    "with_from", "aspect", "name", "synonym", "object_type", "taxon", "date", "assigned_by",
    "extension", "gene_product_form_id",
)
ENTREZ_DBS = {"ncbigene", "entrezgene", "geneid", "entrez"}


def _open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(
        path, encoding="utf-8")


def read_gaf(path: str, aspects: tuple[str, ...] = ("P", "F", "C"),
             exclude_evidence: tuple[str, ...] = ()) -> pd.DataFrame:
    """Reads a GAF 2.x file (plain or .gz).

    Args:
      path: the GAF file.
      aspects: GO aspects to keep (P biological process, F function, C component).
      exclude_evidence: evidence codes to drop (e.g. ("IEA",)).

    Returns:
      Columns gene_symbol, entrez_id (Int64, missing unless DB is NCBIGene), go_id,
      aspect, evidence; one row per kept annotation, duplicates removed.

    Raises:
      AnnotationError: the file is missing, or a data line has fewer than 15 columns
        (the message gives the line number).
    """
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: GAF file not found")
    rows = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip() or line.startswith("!"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 15:
                raise AnnotationError(
                    f"{path}: line {lineno} has {len(parts)} tab-separated columns; "
                    f"GAF 2.x needs 15 to 17")
            if "NOT" in parts[3].split("|"):
                continue
            if parts[8] not in aspects or parts[6] in exclude_evidence:
                continue
            entrez = parts[1] if parts[0].lower() in ENTREZ_DBS else None
            rows.append((parts[2], entrez, parts[4], parts[8], parts[6]))
    out = pd.DataFrame(rows, columns=["gene_symbol", "entrez_id", "go_id", "aspect", "evidence"])
    out["entrez_id"] = pd.to_numeric(out["entrez_id"], errors="coerce").astype("Int64")
    return out.drop_duplicates(["gene_symbol", "entrez_id", "go_id"]).reset_index(drop=True)


def read_obo(path: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Reads `is_a` edges and names of the [Term] stanzas of an OBO file.

    Args:
      path: the OBO file (plain or .gz).

    Returns:
      (parents, names): term id -> set of direct is_a parents; term id -> name.
      Obsolete terms are kept (with no parents) so old annotations still resolve.

    Raises:
      AnnotationError: the file is missing or holds no [Term] stanza.
    """
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: OBO file not found")
    parents: dict[str, set[str]] = {}
    names: dict[str, str] = {}
    term, in_term = None, False
    with _open_text(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("["):
                in_term, term = line == "[Term]", None
                continue
            if not in_term or ":" not in line:
                continue
            tag, value = line.split(":", 1)
            value = value.split("!")[0].strip()
            if tag == "id":
                term = value
                parents.setdefault(term, set())
            elif term is None:
                continue
            elif tag == "name":
                names[term] = value
            elif tag == "is_a":
                parents[term].add(value.split()[0])
    if not parents:
        raise AnnotationError(f"{path}: no [Term] stanza found; is this an OBO file?")
    return parents, names


def ancestors(parents: dict[str, set[str]]) -> dict[str, frozenset[str]]:
    """All is_a ancestors of every term (the term itself excluded), memoised."""
    memo: dict[str, frozenset[str]] = {}

    def visit(term: str, stack: frozenset[str]) -> frozenset[str]:
        if term in memo:
            return memo[term]
        out: set[str] = set()
        for p in parents.get(term, ()):
            if p in stack:  # a cycle would be a broken ontology; do not recurse forever
                continue
            out.add(p)
            out |= visit(p, stack | {term})
        memo[term] = frozenset(out)
        return memo[term]

    for t in list(parents):
        visit(t, frozenset())
    return memo


def propagate(gaf: pd.DataFrame, parents: dict[str, set[str]]) -> pd.DataFrame:
    """Adds, for each annotation, rows for all is_a ancestors of its term.

    Args:
      gaf: output of `read_gaf`.
      parents: term -> direct parents, from `read_obo`.

    Returns:
      The annotations with ancestor rows added, duplicates removed.
    """
    anc = ancestors(parents)
    terms = gaf["go_id"].unique()
    extra = [(t, a) for t in terms for a in anc.get(t, ())]
    if not extra:
        return gaf
    edges = pd.DataFrame(extra, columns=["go_id", "ancestor"])
    up = gaf.merge(edges, on="go_id").drop(columns="go_id").rename(columns={"ancestor": "go_id"})
    both = pd.concat([gaf, up[gaf.columns]], ignore_index=True)
    return both.drop_duplicates(["gene_symbol", "entrez_id", "go_id"]).reset_index(drop=True)


def go_annotations(gaf: pd.DataFrame, names: dict[str, str] | None = None,
                   source: str = "<gaf>") -> Annotations:
    """GO groups (category "go"); every annotated gene is a candidate negative.

    Args:
      gaf: annotations from `read_gaf` (optionally `propagate`d).
      names: GO id -> term name, written as the group description.
      source: file name for messages.

    Raises:
      AnnotationError: no annotation is left.
    """
    if gaf.empty:
        raise AnnotationError(f"{source}: no GO annotations left after filtering")
    keys = ["gene_symbol"] + (["entrez_id"] if gaf["entrez_id"].notna().any() else [])
    long = gaf[keys].copy()
    long["annotation"] = gaf["go_id"].to_numpy()
    long["category"] = "go"
    if names:
        long["description"] = gaf["go_id"].map(names).to_numpy()
    return from_long(long, source)


def load_go(gaf_path: str, obo_path: str | None = None,
            aspects: tuple[str, ...] = ("P", "F", "C"),
            exclude_evidence: tuple[str, ...] = ()) -> Annotations:
    """Reads a GAF (and optional OBO for propagation) into GO groups."""
    gaf = read_gaf(gaf_path, aspects=aspects, exclude_evidence=exclude_evidence)
    names = None
    if obo_path:
        parents, names = read_obo(obo_path)
        gaf = propagate(gaf, parents)
    return go_annotations(gaf, names, source=gaf_path)

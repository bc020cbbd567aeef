"""What every column of `bin/evaluate`'s tables means: the definitions the report prints.

`define(columns, embeddings)` returns the definitions of the columns a table shows, so
the report defines every column it reports; `undefined` lists those it cannot (a test
keeps that list empty for every table the report draws).
"""

from __future__ import annotations

from collections.abc import Iterable

COLUMNS: dict[str, str] = {
    # embeddings
    "embedding": "name of the embedding (a --embeddings name, or the file name).",
    "file": "the table the embedding was read from.",
    "level": "what one row of the table is: patch, image, (gene, donor) or gene.",
    "rows": "rows of the table scored (after the --splits choice).",
    "rows_in_file": "rows of the table before the --splits choice.",
    "dimensions": "embedding width D (numeric columns read as the embedding).",
    "genes": "distinct genes among the rows scored.",
    "donors": "distinct donors among the rows scored.",
    "splits": "the record splits scored and why (--splits; default: every split but train).",
    "model": "the SavedModel that made the table (embed_summary.json beside it), if known.",
    # annotations
    "annotation": "the gene group (a value of the category, e.g. laminar, layer 5, a GO term).",
    "category": "the annotation source column the group comes from (all = every group).",
    "n_genes": "genes in the group (positives) among the genes scored.",
    "n_total": "genes scored for the group: its positives plus the negatives (the other "
               "genes annotated in the category).",
    "auc": "area under the ROC curve of the held-out genes, mean over the folds "
           "(0.5 = chance).",
    "auc_pr": "average precision (area under the precision-recall curve), mean over the "
              "folds; chance is the fraction of positives.",
    "f1": "F1 of the held-out genes at decision threshold 0, mean over the folds.",
    "max_p": "the largest one-sided Mann-Whitney U p-value over the folds (held-out "
             "positives scored above negatives in every fold).",
    "max_p_bh": "max_p adjusted with Benjamini-Hochberg over all groups of the embedding.",
    "converged": "fraction of folds whose solver converged before max_iter.",
    "key": "the column joining the embedding to the annotations (gene_symbol or entrez_id).",
    "flag": "empty when the set-up is well posed; otherwise why the figure is degenerate "
            "(too few genes or queries, chance >= 0.5, more dimensions than training genes "
            "in a fold, constant predictions): do not read it as a result.",
    "description": "the group's description in its source (e.g. the GO term name).",
    "n_groups": "groups scored (in the comparison: groups scored by both embeddings).",
    "mean_auc": "mean of auc over the groups (diagnosis: over the genes).",
    "median_auc": "median of auc over the groups (diagnosis: over the genes).",
    "mean_auc_pr": "mean of auc_pr over the groups.",
    "mean_f1": "mean of f1 over the groups (diagnosis: over the genes).",
    "n_significant_bh": "groups significant at a false discovery rate of 5% "
                        "(Benjamini-Hochberg adjusted max_p < 0.05, over all groups of the "
                        "embedding).",
    "n_flagged": "groups whose flag is set (degenerate set-up).",
    "best": "the embedding with the highest AUC for the group.",
    "source": "the annotation file.",
    "n_table_genes": "distinct genes in the embedding table.",
    "n_matched": "of those, genes found in the annotation source.",
    "n_used": "genes scored: matched by every embedding when common_genes is on.",
    # comparisons
    "a": "first embedding of the pair.",
    "b": "second embedding of the pair.",
    "metric": "the score compared (higher is better).",
    "a_wins": "groups where a scores strictly higher than b.",
    "b_wins": "groups where b scores strictly higher than a.",
    "ties": "groups where a and b score the same.",
    "mean_a": "mean score of a over the groups of the row.",
    "mean_b": "mean score of b over the groups of the row.",
    "mean_diff": "mean of (a - b) over the groups.",
    "median_diff": "median of (a - b) over the groups.",
    "wilcoxon_stat": "statistic of the two-sided Wilcoxon signed-rank test of a vs b "
                     "across groups.",
    "p_value": "p-value of that test (not corrected for the number of pairs).",
    # diagnosis
    "features": "feature set: embedding, demographics alone, both (combined), or a "
                "Gaussian random embedding of the same shape (random).",
    "embedding_wins": "genes where the embedding's AUC is strictly higher than this "
                      "feature set's.",
    "gene_symbol": "the gene.",
    "n_donors": "labelled donors the gene was assayed in.",
    "n_positive": "of those, donors of the positive class.",
    "auc_embedding": "diagnosis AUC from the gene's donor-level embedding.",
    "f1_embedding": "diagnosis F1 from the donor-level embedding.",
    "auc_demographics": "diagnosis AUC from demographics alone.",
    "f1_demographics": "diagnosis F1 from demographics alone.",
    "auc_combined": "diagnosis AUC from demographics and embedding.",
    "f1_combined": "diagnosis F1 from demographics and embedding.",
    "auc_random": "diagnosis AUC from a random embedding (chance baseline).",
    "f1_random": "diagnosis F1 from a random embedding.",
    # re-identification
    "candidates": "candidate set of a query image: other_donor (images of other donors, "
                  "the paper's metric), all (every other image), same_donor.",
    "rank1": "fraction of all queries whose nearest candidate shows the same gene "
             "(unanswerable queries count as misses).",
    "rank1_answerable": "rank1 over the answerable queries only (those with a same-gene "
                        "candidate).",
    "chance": "exact chance of rank1: mean over queries of positives / candidates.",
    "chance_answerable": "chance over the answerable queries.",
    "map": "mean average precision of the ranked candidates over answerable queries.",
    "fold_over_chance": "rank1_answerable / chance_answerable: how many times more often "
                        "than chance the nearest candidate shows the same gene.",
    "n_queries": "query rows (every row scored is a query).",
    "n_answerable": "queries with at least one same-gene candidate in the set.",
}


def define(columns: Iterable[str], embeddings: Iterable[str] = ()) -> dict[str, str]:
    """Definitions of `columns` (in order); an embedding name as a column is its AUC."""
    names = set(embeddings)
    out = {}
    for c in columns:
        if c in COLUMNS:
            out[c] = COLUMNS[c]
        elif c in names:
            out[c] = f"auc of embedding '{c}' for the group."
    return out


def undefined(columns: Iterable[str], embeddings: Iterable[str] = ()) -> list[str]:
    """The columns `define` has no definition for."""
    known = define(columns, embeddings)
    return [c for c in columns if c not in known]

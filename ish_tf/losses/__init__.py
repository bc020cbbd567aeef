"""Losses: triplet losses with batch-hard, batch-all and semi-hard mining."""

from ish_tf.losses.triplet import (
    LOSSES,
    METRICS,
    MINING,
    STAT_NAMES,
    TripletLoss,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    check_margin,
    check_metric,
    check_mining,
    get_loss,
    pairwise_distances,
    semi_hard_triplet_loss,
    triplet_loss,
)

__all__ = [
    "LOSSES", "METRICS", "MINING", "STAT_NAMES", "TripletLoss", "batch_all_triplet_loss",
    "batch_hard_triplet_loss", "check_margin", "check_metric", "check_mining", "get_loss",
    "pairwise_distances", "semi_hard_triplet_loss", "triplet_loss",
]

"""The triplet family's settings (flags `--triplet_*`)."""

from __future__ import annotations

import dataclasses

from ish_tf.config import setting

MININGS = ("batch_hard", "batch_all", "semi_hard")
METRICS = ("euclidean", "sqeuclidean", "cityblock")


@dataclasses.dataclass
class TripletConfig:
    """Gene re-identification: backbone + embedding head, P x K batches, triplet loss.

    Defaults are the paper's configuration (Abed-Esfahani et al. 2022).
    """

    backbone: str = setting("resnet50", "Backbone network; each carries the preprocessing "
                            "matching its weights.", choices=("resnet50", "small_cnn"))
    backbone_weights: str = setting("imagenet", "imagenet | none | path to a weights file "
                                    "(.weights.h5) of the backbone.")
    embedding_dim: int = setting(128, "Embedding dimension D.", lower=1)
    head_units: int = setting(1024, "Hidden units of the embedding head.", lower=1)
    l2_normalize: bool = setting(False, "L2-normalise the embeddings.")
    head_batch_norm: str = setting("batch", "Head batch norm: per replica, synchronised "
                                   "across replicas, or none.", choices=("batch", "sync", "none"))
    P: int = setting(17, "Genes (identities) per batch.", lower=2)
    K: int = setting(17, "Patches per gene per batch (global batch = P*K); >= 2 so every "
                     "anchor has a positive.", lower=2)
    mining: str = setting("batch_hard", "Triplet mining over the global batch.", choices=MININGS)
    margin: str = setting("soft", "Triplet margin: soft (softplus) or a number.")
    metric: str = setting("euclidean", "Embedding distance of the triplet loss.",
                          choices=METRICS)

    @property
    def global_batch_size(self) -> int:
        """P * K."""
        return self.P * self.K

    def validate(self) -> TripletConfig:
        """Checks ranges; returns self.

        Raises:
          ValueError: naming the offending flag.
        """
        if self.P < 2:
            raise ValueError(f"--triplet_P must be >= 2 (triplets need a negative), got {self.P}")
        if self.K < 2:
            # With K = 1 no anchor has a positive: loss, gradients and active triplets
            # are 0 at every step, and the run would "succeed" having learnt nothing.
            raise ValueError(f"--triplet_K must be >= 2 (every anchor needs a positive "
                             f"of its gene in the batch), got {self.K}")
        if self.embedding_dim < 1 or self.head_units < 1:
            raise ValueError("--triplet_embedding_dim and --triplet_head_units must be >= 1")
        return self

    def shrunk_for_small_run(self) -> TripletConfig:
        """P, K <= 4 for a smoke run."""
        return dataclasses.replace(self, P=min(self.P, 4), K=min(self.K, 4))

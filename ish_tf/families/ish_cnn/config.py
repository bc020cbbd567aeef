"""The ISH CNN's settings (flags `--ish_cnn_*`)."""

from __future__ import annotations

import dataclasses

from ish_tf.config import setting


@dataclasses.dataclass
class IshCnnConfig:
    """Patch classifier learning morphology from spatial-expression labels.

    The patch size is --input_size; the class names are read from the records (or
    given) and kept here, hence in RUN/model_config.json, for prediction.
    """

    filters: tuple[int, ...] = setting((16, 32, 64, 64, 96), "Filters per conv block, "
                                       "comma-separated (the last repeats).")
    convs_per_block: int = setting(2, "3x3 valid convolutions per block.", lower=1)
    max_blocks: int = setting(5, "Most conv blocks (each halves the size; fewer when the "
                              "patch is small).", lower=1)
    pooling: str = setting("avg", "Global average pooling, or flatten (position-aware).",
                           choices=("avg", "flatten"))
    dropout: float = setting(0.3, "Dropout before the softmax layer.", lower=0.0, upper=0.95)
    batch_norm: bool = setting(True, "Batch normalisation after each convolution.")
    head_units: int = setting(1024, "Width of the 1x1 convolution before the classifier.",
                              lower=1)
    classes: tuple[str, ...] = setting((), "Expected class names, comma-separated; empty = "
                                       "read from the records.")
    intensity_jitter: float = setting(0.15, "Training images are multiplied by a random "
                                      "factor in [1 - x, 1 + x] (robustness to stain and "
                                      "slide brightness).", lower=0.0, upper=0.9)
    P: int = setting(17, "Classes per batch (at most the number of classes).", lower=2)
    K: int = setting(17, "Patches per class per batch (global batch = P*K).", lower=1)
    bn_momentum: float = setting(0.9, "Momentum of the batch-norm moving statistics.",
                                 flag=False)
    n_classes: int = setting(0, "Number of classes when no names are given (models built "
                             "in code).", flag=False)

    @property
    def global_batch_size(self) -> int:
        return self.P * self.K

    def validate(self) -> IshCnnConfig:
        """Raises ValueError naming the flag of a bad value; returns self."""
        if not self.filters or min(self.filters) < 1:
            raise ValueError(f"--ish_cnn_filters must be positive integers, got {self.filters}")
        if self.P < 2 or self.K < 1:
            raise ValueError(f"--ish_cnn_P must be >= 2 and --ish_cnn_K >= 1, got "
                             f"{self.P}, {self.K}")
        return self

    def shrunk_for_small_run(self) -> IshCnnConfig:
        """P, K <= 4 for a smoke run."""
        return dataclasses.replace(self, P=min(self.P, 4), K=min(self.K, 4))

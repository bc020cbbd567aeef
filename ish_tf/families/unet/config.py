"""The U-Net segmenter's settings (flags `--unet_*`)."""

from __future__ import annotations

import dataclasses

from ish_tf.config import setting


@dataclasses.dataclass
class UnetConfig:
    """The U-Net tissue segmenter trained on (section image, true mask) pairs."""

    mask_manifest: str = setting("", "Manifest CSV whose images have true tissue masks "
                                 "(bin/synth writes masks/{image_id}.png beside it).")
    mask_dir: str = setting("", "Directory of the masks {image_id}.png; empty = masks/ "
                            "beside --unet_mask_manifest.")
    val_fraction: float = setting(0.1, "Fraction of the pairs held out (listed in "
                                  "RUN/unet_split.csv, never trained on).", lower=0.0, upper=0.9)
    batch_size: int = setting(8, "Image/mask pairs per step (global batch).", lower=1)
    filters: int = setting(16, "Filters of the first level (doubled at each level down).",
                           lower=1)
    depth: int = setting(4, "Number of 2x downsamplings; --input_size must be divisible by "
                         "2**depth.", lower=1)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size

    def validate(self) -> UnetConfig:
        """Raises ValueError naming the flag of an out-of-range value; returns self."""
        if self.batch_size < 1:
            raise ValueError(f"--unet_batch_size must be >= 1, got {self.batch_size}")
        if self.depth < 1 or self.filters < 1:
            raise ValueError(f"--unet_depth and --unet_filters must be >= 1, got "
                             f"{self.depth}, {self.filters}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--unet_val_fraction must be in [0, 1), got {self.val_fraction}")
        return self

    def shrunk_for_small_run(self) -> UnetConfig:
        """At most 4 pairs per step."""
        return dataclasses.replace(self, batch_size=min(self.batch_size, 4))

"""The CDAE family's settings (flags `--cdae_*`), shared by `cdae` and `cdae_supervised`."""

from __future__ import annotations

import dataclasses

from ish_tf.config import setting

UNPOOL_MODES: tuple[str, ...] = ("switches", "nearest")
CODE_POOLING: tuple[str, ...] = ("flatten", "average")
NORMS: tuple[str, ...] = ("batch", "none")
NOISES: tuple[str, ...] = ("none", "gaussian", "masking", "salt_pepper")
LOSSES: tuple[str, ...] = ("mse", "bce")
POOL_IMPLEMENTATIONS: tuple[str, ...] = ("kernel", "window")




@dataclasses.dataclass
class CdaeConfig:
    """Convolutional denoising autoencoder of whole sections, and its supervised twin.

    Model: `depth` blocks of 3x3 convolutions + 2x2 max pooling with switches, a dense
    code, and the mirrored decoder. Task: corruption, loss, batch, batch-norm
    re-estimation. Supervised (`--model=cdae_supervised`): GO terms, initialisation.
    """

    depth: int = setting(4, "Conv+pool blocks (each halves the size); --input_size must "
                         "be >= 2**depth.", lower=1)
    filters: tuple[int, ...] = setting((16, 32, 64, 64), "Filters per block, "
                                       "comma-separated (the last repeats if fewer than "
                                       "--cdae_depth).")
    convs_per_block: int = setting(1, "3x3 convolutions per block.", lower=1)
    code_size: int = setting(128, "Size of the dense code (the representation bin/embed "
                             "stores).", lower=1)
    code_pooling: str = setting("flatten", "What the code is computed from: the flattened "
                                "last pooled block (where and what), or the average of the "
                                "last block's features over all positions (translation-"
                                "invariant: the decoder gets the layout from the switches).",
                                choices=CODE_POOLING)
    norm: str = setting("batch", "Batch normalisation between each 3x3 convolution and its "
                        "ReLU (without it the quickstart CDAE barely beats the mean image in "
                        "reconstruction).", choices=NORMS)
    unpool: str = setting("switches", "Decoder unpooling: max-unpool at the encoder's "
                          "switches, or nearest upsampling.", choices=UNPOOL_MODES)
    pool_implementation: str = setting("kernel", "Switch pooling: the TensorFlow kernel, or "
                                       "'window' (same switches, compiles under XLA; "
                                       "--jit_compile selects it).", choices=POOL_IMPLEMENTATIONS,
                                       flag=False)
    invert: bool = setting(True, "Scale pixels to 1 - x/255 inside the model (white slide -> "
                           "0, stain -> 1); fluorescence sections (--mask_background=dark) "
                           "want --nocdae_invert, and training warns when the records say "
                           "otherwise.")
    aspect: float = setting(1.0, "Input width / height (height = --input_size); must match "
                            "the whole-image records.", lower=0.0)
    noise: str = setting("masking", "Input corruption while training (in the [0, 1] scaled "
                         "space): additive gaussian (std = level), masking (a fraction `level` "
                         "of pixels set to 0) or salt-and-pepper (a fraction `level` set to 0 "
                         "or 1).", choices=NOISES)
    noise_level: float = setting(0.25, "Noise std or corrupted fraction.", lower=0.0)
    loss: str = setting("bce", "Reconstruction loss against the clean scaled image.",
                        choices=LOSSES)
    batch_size: int = setting(32, "Images per step (global batch).", lower=1)
    image_every: int = setting(500, "Steps between TensorBoard images of input / noisy input "
                               "/ reconstruction (logs/reconstruction); 0 = only at step 0.",
                               lower=0)
    bn_images: int = setting(2048, "With --cdae_norm=batch: clean training images on which "
                             "the final model's batch-normalisation statistics are "
                             "re-estimated before model.keras is written (training saw "
                             "corrupted images, so the moving averages describe those); 0 = "
                             "keep the moving averages.", lower=0)
    dropout: float = setting(0.0, "--model=cdae_supervised: dropout before the sigmoid head.",
                             lower=0.0, upper=0.95)
    init_from: str = setting("", "--model=cdae_supervised: a CDAE run directory (or .keras) "
                             "to initialise the encoder from; empty = from scratch.")
    gaf: str = setting("", "--model=cdae_supervised: GAF file of the terms to predict "
                       "(bin/synth writes OUT/go.gaf).")
    annotations: str = setting("", "--model=cdae_supervised: or a gene annotation CSV "
                               "(gene_symbol + categorical columns).")
    term_min_genes: int = setting(15, "--model=cdae_supervised: terms with fewer training "
                                  "genes are left out.", lower=1)
    term_max_genes: int = setting(500, "--model=cdae_supervised: terms with more training "
                                  "genes are left out.", lower=1)
    terms: tuple[str, ...] = setting((), "The supervised head's terms, chosen from the "
                                     "training genes.", flag=False)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size

    def validate(self) -> CdaeConfig:
        """Raises ValueError naming the flag of an out-of-range value; returns self."""
        if self.depth < 1:
            raise ValueError(f"--cdae_depth must be >= 1, got {self.depth}")
        if not self.filters or min(self.filters) < 1:
            raise ValueError(f"--cdae_filters must be positive integers, got {self.filters}")
        if self.convs_per_block < 1:
            raise ValueError(f"--cdae_convs_per_block must be >= 1, got {self.convs_per_block}")
        if self.code_size < 1:
            raise ValueError(f"--cdae_code_size must be >= 1, got {self.code_size}")
        for name, value, allowed in (("cdae_norm", self.norm, NORMS),
                                     ("cdae_unpool", self.unpool, UNPOOL_MODES),
                                     ("cdae_code_pooling", self.code_pooling, CODE_POOLING),
                                     ("cdae_noise", self.noise, NOISES),
                                     ("cdae_loss", self.loss, LOSSES)):
            if value not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {value!r}")
        if self.pool_implementation not in POOL_IMPLEMENTATIONS:
            raise ValueError(f"pool_implementation must be one of {POOL_IMPLEMENTATIONS}, got "
                             f"{self.pool_implementation!r}")
        if self.aspect <= 0:
            raise ValueError(f"--cdae_aspect must be > 0, got {self.aspect}")
        if self.batch_size < 1:
            raise ValueError(f"--cdae_batch_size must be >= 1, got {self.batch_size}")
        return self

    def shrunk_for_small_run(self) -> CdaeConfig:
        """At most 8 images per step."""
        return dataclasses.replace(self, batch_size=min(self.batch_size, 8))

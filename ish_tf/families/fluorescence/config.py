"""Settings of the fluorescence families (flags `--fluorescence_*`).

Shared by `--model=fluorescence` (supervised: backbone -> GAP -> L2-normalised features
-> ArcFace or softmax over siRNAs) and `--model=mean_teacher` (the same network as
student and EMA teacher, labelled and unlabelled wells in each batch). Defaults for the
network and the mean teacher are DeepNoise's (arXiv 2209.05772, and the public code
Scu-sen/Recursion-Cellular-Image-Classification-Challenge) where they do not depend on
the data set's size; `configs/mean_teacher_rxrx1.cfg` holds the full RxRx1 recipe.
"""

from __future__ import annotations

import dataclasses

from ish_tf.config import setting

BACKBONES = ("small_cnn", "resnet50", "xception")
HEADS = ("arcface", "softmax")
NORMALIZATIONS = ("plate", "experiment", "none")
TEACHER_BN = ("ema", "student")
PSEUDO_LABELS = ("argmax", "plate_assignment")


@dataclasses.dataclass
class FluorescenceConfig:
    """Multi-channel site images -> siRNA class, with an optional EMA teacher."""

    backbone: str = setting("small_cnn", "Backbone with a C-channel stem: small_cnn (CPU) or "
                            "resnet50 / xception (keras.applications).", choices=BACKBONES)
    backbone_weights: str = setting("none", "none | path to the keras.applications notop "
                                    "ImageNet weights (.h5) of the backbone: its RGB stem "
                                    "kernels are averaged over RGB and tiled to the C "
                                    "channels (scaled 3/C).")
    widths: tuple[int, ...] = setting((32, 64, 96), "small_cnn: filters of each strided "
                                      "block.")
    channels: int = setting(6, "Image channels C (RxRx1: 6 stains).", lower=1)
    embedding_dim: int = setting(0, "Size of a linear layer between GAP and the "
                                 "L2-normalised features (0: the GAP features themselves).",
                                 lower=0)
    head: str = setting("arcface", "Classifier head on the L2-normalised features.",
                        choices=HEADS)
    arcface_scale: float = setting(30.0, "ArcFace scale s (logits are s * cos).", lower=0.0)
    arcface_margin: float = setting(0.1, "ArcFace additive angular margin m (radians).",
                                    lower=0.0)
    normalization: str = setting("plate", "Input normalisation: per (experiment, plate, "
                                 "channel) mean/std, per (experiment, channel), or none "
                                 "(pixels / 255).", choices=NORMALIZATIONS)
    norm_jitter: float = setting(0.1, "Training: each image's mean and std are scaled by "
                                 "U(1 - j, 1 + j) per channel.", lower=0.0, upper=0.9)
    batch_size: int = setting(32, "Labelled sites per step (global batch).", lower=1)
    noise_augment: float = setting(0.0, "Training: scale of the technical-noise augmentation "
                                   "of each view (per-site illumination gradient and "
                                   "vignetting up to 0.35 and 0.3 times this, well-edge "
                                   "dimming, and focus blur); 0: off.", lower=0.0,
                                   upper=2.0)
    # Mean teacher (--model=mean_teacher).
    unlabelled_split: str = setting("test", "--model=mean_teacher: split whose sites are "
                                    "the unlabelled wells (held-out experiments; their "
                                    "labels are never read).")
    unlabelled_batch_size: int = setting(32, "--model=mean_teacher: unlabelled sites per "
                                         "step (global).", lower=0)
    ema_decays: tuple[float, ...] = setting((0.5, 0.9, 0.99, 0.999), "--model=mean_teacher: "
                                            "EMA decay of the teacher, ramped ...")
    ema_steps: tuple[int, ...] = setting((0, 50, 200, 1000), "--model=mean_teacher: ... from "
                                         "these global steps on (one per decay, increasing, "
                                         "starting at 0).")
    consistency_weight: float = setting(100.0, "--model=mean_teacher: maximum weight of the "
                                        "softmax-MSE consistency loss.", lower=0.0)
    consistency_rampup: int = setting(200, "--model=mean_teacher: steps T of the weight "
                                      "ramp w * exp(-5 (1 - t/T)^2).", lower=0)
    pseudo_label_weight: float = setting(0.05, "--model=mean_teacher: weight of the "
                                         "cross-entropy to the unlabelled sites' "
                                         "pseudo-labels (--fluorescence_pseudo_labels; 0: "
                                         "off).", lower=0.0)
    pseudo_labels: str = setting("argmax", "--model=mean_teacher: the pseudo-label of an "
                                 "unlabelled site: argmax (the teacher's argmax on the batch) "
                                 "or plate_assignment (the teacher's plate-aware assignment of "
                                 "every unlabelled well, recomputed every "
                                 "--fluorescence_pseudo_label_every steps).",
                                 choices=PSEUDO_LABELS)
    pseudo_label_every: int = setting(50, "--model=mean_teacher with plate_assignment "
                                      "pseudo-labels: steps between two assignments (0: "
                                      "once, from the starting teacher). Each one predicts "
                                      "every unlabelled site, so on RxRx1 (~40k test "
                                      "sites) choose about an epoch.", lower=0)
    teacher_batch_norm: str = setting("ema", "--model=mean_teacher: the teacher's batch-norm "
                                      "moving statistics: ema (averaged like the weights) or "
                                      "student (copied from the student each step).",
                                      choices=TEACHER_BN)
    init_from: str = setting("", "A RUN/model.keras of the same network to start from "
                             "(--model=mean_teacher: student and teacher; the recipe starts "
                             "from the supervised --model=fluorescence run).")
    # Read from the records by the task.
    classes: tuple[str, ...] = setting((), "Class (siRNA) names in label order, read from "
                                       "the records.", flag=False)
    n_classes: int = setting(0, "Number of classes when no names are given (models built "
                             "in code).", flag=False)

    @property
    def num_classes(self) -> int:
        """len(classes), else n_classes."""
        return len(self.classes) or int(self.n_classes)

    @property
    def global_batch_size(self) -> int:
        """Labelled sites per step (the mean teacher adds its unlabelled ones)."""
        return self.batch_size

    def validate(self) -> FluorescenceConfig:
        """Checks ranges; returns self.

        Raises:
          ValueError: naming the offending flag.
        """
        if self.backbone not in BACKBONES:
            raise ValueError(f"--fluorescence_backbone must be one of {BACKBONES}, "
                             f"got {self.backbone!r}")
        if self.head not in HEADS:
            raise ValueError(f"--fluorescence_head must be one of {HEADS}, got {self.head!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"--fluorescence_normalization must be one of {NORMALIZATIONS}, "
                             f"got {self.normalization!r}")
        if self.teacher_batch_norm not in TEACHER_BN:
            raise ValueError(f"--fluorescence_teacher_batch_norm must be one of {TEACHER_BN}")
        if self.pseudo_labels not in PSEUDO_LABELS:
            raise ValueError(f"--fluorescence_pseudo_labels must be one of {PSEUDO_LABELS}, "
                             f"got {self.pseudo_labels!r}")
        if self.pseudo_label_every < 0:
            raise ValueError(f"--fluorescence_pseudo_label_every must be >= 0, got "
                             f"{self.pseudo_label_every}")
        if self.channels < 1 or self.batch_size < 1 or self.unlabelled_batch_size < 0:
            raise ValueError("--fluorescence_channels and --fluorescence_batch_size must be "
                             ">= 1, --fluorescence_unlabelled_batch_size >= 0")
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"--fluorescence_widths must be positive integers, got "
                             f"{self.widths}")
        if self.arcface_scale <= 0 or not 0 <= self.arcface_margin < 1.5:
            raise ValueError("--fluorescence_arcface_scale must be > 0 and "
                             "--fluorescence_arcface_margin in [0, 1.5) radians")
        if not 0 <= self.norm_jitter < 1:
            raise ValueError(f"--fluorescence_norm_jitter must be in [0, 1), got "
                             f"{self.norm_jitter}")
        decays, steps = tuple(self.ema_decays), tuple(int(s) for s in self.ema_steps)
        if not decays or len(decays) != len(steps):
            raise ValueError("--fluorescence_ema_decays and --fluorescence_ema_steps need one "
                             f"step per decay, got {decays} and {steps}")
        if steps[0] != 0 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)):
            raise ValueError(f"--fluorescence_ema_steps must start at 0 and increase, got "
                             f"{steps}")
        if any(not 0 <= d < 1 for d in decays):
            raise ValueError(f"--fluorescence_ema_decays must lie in [0, 1), got {decays}")
        return self

    def shrunk_for_small_run(self) -> FluorescenceConfig:
        """At most 16 labelled and 16 unlabelled sites per step."""
        return dataclasses.replace(self, batch_size=min(self.batch_size, 16),
                                   unlabelled_batch_size=min(self.unlabelled_batch_size, 16))

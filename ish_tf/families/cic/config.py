"""The cell-identity-code family's settings (flags `--cic_*`).

Shared by `--model=cic` (the autoencoder) and `--model=cic_classifier` (the
classifier-autoencoder: code -> softmax over cell types, trained jointly).
"""

from __future__ import annotations

import dataclasses

from ish_tf.config import setting

ACTIVATIONS = ("log_sigmoid", "relu", "tanh")


@dataclasses.dataclass
class CicConfig:
    """Dense autoencoder of expression profiles: profile (D,) -> code (C,) -> profile (D,).

    Defaults are the paper's (Abdolhosseini et al., Sci Rep 2019): Linear -> LogSigmoid
    -> 2000 units -> code of 30, mirrored decoder, MSE. The input dimension D and the
    class names are read from the records by the task and kept here (hence in
    RUN/model_config.json), never set by flags.
    """

    hidden: tuple[int, ...] = setting((2000,), "Widths of the encoder's hidden layers, "
                                      "comma-separated (the decoder mirrors them).")
    activation: str = setting("log_sigmoid", "Activation after each hidden layer.",
                              choices=ACTIVATIONS)
    code_size: int = setting(30, "Size of the cell identity code (the linear layer "
                             "\"code\").", lower=1)
    classifier_hidden: int = setting(0, "--model=cic_classifier: units of the one hidden "
                                     "layer between code and softmax (0: code -> softmax).",
                                     lower=0)
    class_weight: float = setting(1.0, "--model=cic_classifier: weight of the "
                                  "cross-entropy added to the reconstruction MSE.", lower=0.0)
    batch_size: int = setting(32, "Profiles per step (global batch).", lower=1)
    classifier: bool = setting(False, "The classifier-autoencoder variant (set by "
                               "--model=cic_classifier).", flag=False)
    dim: int = setting(0, "Input dimension D (genes), read from the records.", flag=False)
    classes: tuple[str, ...] = setting((), "Class (cell type) names in label order, read "
                                       "from the records.", flag=False)
    n_classes: int = setting(0, "Number of classes when no names are given (models built "
                             "in code).", flag=False)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size

    @property
    def num_classes(self) -> int:
        """len(classes), else n_classes."""
        return len(self.classes) or int(self.n_classes)

    def validate(self) -> CicConfig:
        """Raises ValueError naming the flag of an out-of-range value; returns self."""
        if self.batch_size < 1:
            raise ValueError(f"--cic_batch_size must be >= 1, got {self.batch_size}")
        if any(int(h) < 1 for h in self.hidden):
            raise ValueError(f"--cic_hidden must be positive integers, got {self.hidden}")
        if self.code_size < 1:
            raise ValueError(f"--cic_code_size must be >= 1, got {self.code_size}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"--cic_activation must be one of {ACTIVATIONS}, "
                             f"got {self.activation!r}")
        if self.classifier_hidden < 0 or self.class_weight < 0:
            raise ValueError("--cic_classifier_hidden and --cic_class_weight must be >= 0")
        if self.dim < 0:
            raise ValueError(f"input dimension must be >= 0, got {self.dim}")
        return self

    def shrunk_for_small_run(self) -> CicConfig:
        """At most 16 profiles per step."""
        return dataclasses.replace(self, batch_size=min(self.batch_size, 16))

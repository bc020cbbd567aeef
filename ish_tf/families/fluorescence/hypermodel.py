"""KerasTuner space of the fluorescence families, scored by validation well accuracy.

Besides the shared learning rate, flips and steps (`--tune_*`), the space (in code,
`HEAD_SPACE` and `TEACHER_SPACE`) covers the head (ArcFace or softmax, ArcFace's s and
m) and, for `--model=mean_teacher`, the consistency weight and the pseudo-label
weight (`PLATE_PSEUDO_LABEL_WEIGHTS`, never 0, with plate-assignment pseudo-labels,
which need a weight). The objective `val_accuracy` is the well accuracy of the model's
own argmax on the validation split (labelled experiments held out by `bin/extract`); the
plate-assigned accuracy is reported beside it, never optimised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras_tuner

from ish_tf.families import ModelConfig
from ish_tf.train import TrainConfig
from ish_tf.tune.hypermodels import FamilyHyperModel, hp_choice

HEAD_SPACE: dict[str, tuple] = {
    "head": ("arcface", "softmax"),
    "arcface_scale": (30.0, 16.0, 64.0),
    "arcface_margin": (0.1, 0.2, 0.3),
}
TEACHER_SPACE: dict[str, tuple] = {
    "consistency_weight": (100.0, 10.0),
    "pseudo_label_weight": (0.05, 0.0),
}
#: The pseudo-label weights tried with `--fluorescence_pseudo_labels=plate_assignment`.
PLATE_PSEUDO_LABEL_WEIGHTS = (1.0, 0.3)


class FluorescenceHyperModel(FamilyHyperModel):
    """Head and mean-teacher weights; objective: validation well accuracy."""

    objective_name = "val_accuracy"
    objective_direction = "max"

    def _space(self) -> dict[str, tuple]:
        space = dict(HEAD_SPACE)
        if self.model_config.model == "mean_teacher":
            space.update(TEACHER_SPACE)
            if self.model_config.family.pseudo_labels == "plate_assignment":
                space["pseudo_label_weight"] = PLATE_PSEUDO_LABEL_WEIGHTS
        return space

    def declare_hyperparameters(self, hp: keras_tuner.HyperParameters) -> None:
        """The shared learning rate, flips, steps, then the family's space."""
        super().declare_hyperparameters(hp)
        for name, values in self._space().items():
            hp_choice(hp, name, values)

    def family_overrides(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """`FluorescenceConfig` fields of the trial."""
        out: dict[str, Any] = {}
        for name in self._space():
            if name in values:
                out[name] = str(values[name]) if name == "head" else float(values[name])
        return out

    def score(self, model, model_config: ModelConfig, train_config: TrainConfig
              ) -> dict[str, float]:
        """Well accuracy (and plate-assigned accuracy, chance) on the validation split."""
        from ish_tf.families.fluorescence.data import make_pipeline
        from ish_tf.families.fluorescence.evaluation import evaluate_split, training_class_groups

        records = train_config.records_dir
        family = model_config.family
        pipeline = make_pipeline(records, family.normalization, 0.0, model_config.input_size)
        result = evaluate_split(lambda x: model(x, training=False), records,
                                self.tune_config.validation_split, pipeline,
                                training_class_groups(records, train_config.split))
        return {"val_accuracy": result["accuracy"],
                "val_plate_assignment_accuracy": result["plate_assignment_accuracy"],
                "val_chance": result["chance"], "val_wells": float(result["wells"])}

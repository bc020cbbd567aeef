"""Model families: one package each, one registry entry each.

    ish_tf/families/<name>/config.py   the family's typed config (flags generated from it)
    ish_tf/families/<name>/model.py    builder(ModelConfig) -> keras.Model
    ish_tf/families/<name>/task.py     the training Task
    ...                                what only this family needs

Everything that needs a family (bin/train, bin/tune, bin/export, bin/embed, the
quickstart, the harness test) looks it up here with `get_family(name)`. Adding a family
is one package and one `register_family(FamilySpec(...))` call below. Importing this module is
cheap: builders, tasks and hypermodels are imported on first use.

A run's model is described by a `ModelConfig`: the family name, the input size, the
initialiser seed and the family's typed config. It is saved as RUN/model_config.json.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from typing import Any

from ish_tf.config import from_dict, to_dict
from ish_tf.data.inputs import InputSpec


def resolve_ref(ref: str) -> Any:
    """"package.module:attr" -> the object (imported now)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One model family.

    Attributes:
      name: the `--model` value.
      config: "module:Class" of the typed config dataclass.
      builder: "module:function" building a keras.Model from a `ModelConfig`.
      task: "module:Class" of the training `Task`.
      inputs: what the model takes (`InputSpec`); an image's size None means the
        config's `input_size`.
      outputs: names of the exported outputs, in the Keras model's output order.
      pixels_signature: name of the exported signature taking decoded inputs.
      flag_prefix: prefix of the config's flags (default: the name).
      hypermodel: "module:Class" of the KerasTuner HyperModel, or "" (the generic
        one, scored by validation loss).
      quickstart: "module:function" running the family's quickstart recipe, or "".
      tiny: "module:function" `(workdir, seed) -> (ModelConfig, TrainConfig fields)`
        writing the smallest inputs its task trains on (`ish_tf.families.testing`):
        the shared harness test runs every family through it.
      description: one line for --helpfull and the README.
    """

    name: str
    config: str
    builder: str
    task: str
    inputs: InputSpec
    outputs: tuple[str, ...]
    pixels_signature: str = "predict_images"
    flag_prefix: str = ""
    hypermodel: str = ""
    quickstart: str = ""
    tiny: str = ""
    description: str = ""

    @property
    def prefix(self) -> str:
        """The flag prefix of the family's settings."""
        return self.flag_prefix or self.name

    @property
    def config_cls(self) -> type:
        """The typed config dataclass."""
        return resolve_ref(self.config)

    def import_builder(self) -> None:
        """Imports the builder's module, which registers the family's custom layers
        (before a saved model.keras is deserialised)."""
        importlib.import_module(self.builder.partition(":")[0])

    def build(self, model_config: ModelConfig):
        """Builds the family's keras.Model."""
        return resolve_ref(self.builder)(model_config)

    @property
    def task_cls(self) -> type:
        """The training Task class."""
        return resolve_ref(self.task)

    def tiny_setup(self, workdir: str, seed: int = 0):
        """`(ModelConfig, TrainConfig fields)` of the family's tiny setup (see `tiny`).

        Raises:
          ValueError: the family registered none.
        """
        if not self.tiny:
            raise ValueError(f"family {self.name!r} registers no tiny setup")
        return resolve_ref(self.tiny)(workdir, seed)

    @property
    def hypermodel_cls(self) -> type | None:
        """The family's HyperModel class, or None for the generic one."""
        return resolve_ref(self.hypermodel) if self.hypermodel else None

    def input_spec(self, model_config: ModelConfig | None = None) -> InputSpec:
        """The input of a model built from `model_config` (sizes filled in)."""
        spec = self.inputs
        if spec.kind != "image" or model_config is None:
            return spec
        family = model_config.family
        height = spec.height or model_config.input_size
        aspect = float(getattr(family, "aspect", 1.0) or 1.0)
        width = spec.width or max(int(round(height * aspect)), 1)
        channels = int(getattr(family, "channels", spec.channels) or spec.channels)
        return InputSpec.image(channels, height, width, spec.dtype)


_FAMILIES: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec) -> FamilySpec:
    """Adds (or replaces) a family; the built-in ones are registered below.

    Raises:
      ValueError: no or repeated output names.
    """
    outputs = tuple(spec.outputs)
    if not outputs or len(set(outputs)) != len(outputs):
        raise ValueError(f"family {spec.name!r}: output names must be unique and non-empty, "
                         f"got {outputs}")
    _FAMILIES[spec.name] = spec
    return spec


def family_names() -> list[str]:
    """Registered family names."""
    return sorted(_FAMILIES)


def get_family(name: str) -> FamilySpec:
    """The registered family `name`.

    Raises:
      ValueError: no such family, listing the known ones.
    """
    if name not in _FAMILIES:
        raise ValueError(f"--model={name!r} is not a model family; known: {family_names()}")
    return _FAMILIES[name]


def flag_sections() -> list[tuple[str, FamilySpec]]:
    """(prefix, first family using it) for each distinct config flag section."""
    seen: dict[str, FamilySpec] = {}
    for name in family_names():
        spec = _FAMILIES[name]
        seen.setdefault(spec.prefix, spec)
    return sorted(seen.items())


# --------------------------------------------------------------------------- model config
@dataclasses.dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved as RUN/model_config.json.

    Attributes:
      model: the family name (`--model`).
      input_size: side R of the square input images (height for the CDAE's whole
        sections; unused by vector families).
      seed: initialiser seed (None: Keras' global seed state).
      family: the family's typed config (None: its defaults).
    """

    model: str = "triplet"
    input_size: int = 256
    seed: int | None = None
    family: Any = None

    def __post_init__(self):
        if self.family is None:
            self.family = get_family(self.model).config_cls()

    @property
    def spec(self) -> FamilySpec:
        """The registry entry of `model`."""
        return get_family(self.model)

    def to_json(self) -> str:
        """The config as JSON text (for RUN/model_config.json)."""
        return json.dumps({"builder": self.model, "format": 2,
                           "config": {"model": self.model, "input_size": self.input_size,
                                      "seed": self.seed, "family": to_dict(self.family)}},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parses `to_json` output (and the older layout with `options`).

        Raises:
          ValueError: the text is not a model config, or has unknown keys.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or "config" not in data:
            raise ValueError("not a model_config.json: missing 'config'")
        cfg = dict(data["config"])
        if "family" not in cfg or "options" in cfg:
            cfg = _upgrade_v1(cfg)
        unknown = set(cfg) - {"model", "input_size", "seed", "family"}
        if unknown:
            raise ValueError(f"model_config.json has unknown keys {sorted(unknown)}")
        spec = get_family(cfg.get("model", "triplet"))
        family = from_dict(spec.config_cls, cfg.get("family") or {},
                           f"model_config.json's {spec.name} settings")
        return cls(model=spec.name, input_size=int(cfg.get("input_size", 256)),
                   seed=cfg.get("seed"), family=family)


# Runs written before the typed configs kept the triplet settings at the top level and
# the other families' in an untyped `options` dict, some under other names.
_V1_TOP = ("backbone", "backbone_weights", "embedding_dim", "head_units", "l2_normalize",
           "head_batch_norm")
_V1_RENAMED = {"unet": {"base_filters": "filters"}}


def _upgrade_v1(cfg: dict) -> dict:
    """The pre-registry model_config.json layout -> the current one.

    Raises:
      ValueError: keys that were never part of the old layout (a stale or foreign file).
    """
    unknown = sorted(set(cfg) - {"model", "input_size", "seed", "options", *_V1_TOP})
    if unknown:
        raise ValueError(f"model_config.json has unknown keys {unknown}")
    model = cfg.get("model", "triplet")
    field_names = {f.name for f in dataclasses.fields(get_family(model).config_cls)}
    family: dict[str, Any] = {}
    for key in _V1_TOP:
        # The triplet settings were top-level fields of every family's config then.
        if key in cfg and key in field_names:
            family[key] = cfg[key]
    renames = _V1_RENAMED.get(model, {})
    for key, value in (cfg.get("options") or {}).items():
        key = renames.get(key, key)
        if key not in field_names:
            raise ValueError(f"model_config.json: option {key!r} is not a setting of "
                             f"--model={model}")
        family[key] = value
    return {"model": model, "input_size": cfg.get("input_size", 256), "seed": cfg.get("seed"),
            "family": family}


def build_model(config: ModelConfig):
    """Builds the keras.Model described by `config`."""
    return config.spec.build(config)


def load_model_config(path: str) -> ModelConfig:
    """Reads RUN/model_config.json.

    Raises:
      ValueError: naming `path`, if the file is not a model config.
    """
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        return ModelConfig.from_json(text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from e


def make_task(model_config: ModelConfig, train_config, dataset_fn: Callable | None = None):
    """The training Task of `model_config.model`."""
    return model_config.spec.task_cls(model_config, train_config, dataset_fn)


# --------------------------------------------------------------------------- the registry
_RGB = InputSpec.image(3)
_GRAY = InputSpec.image(1)  # the CDAE reads grayscale whole sections

register_family(FamilySpec(
    name="triplet", config="ish_tf.families.triplet.config:TripletConfig",
    builder="ish_tf.families.triplet.model:build_triplet_model",
    task="ish_tf.families.triplet.task:TripletTask", inputs=_RGB, outputs=("embedding",),
    pixels_signature="embed_images",
    hypermodel="ish_tf.families.triplet.hypermodel:TripletHyperModel",
    quickstart="ish_tf.families.triplet.quickstart:run_quickstart",
    tiny="ish_tf.families.triplet.testing:tiny",
    description="gene re-identification: triplet ResNet50 on ISH patches "
                "(Abed-Esfahani et al. 2022)"))
register_family(FamilySpec(
    name="cdae", config="ish_tf.families.cdae.config:CdaeConfig",
    builder="ish_tf.families.cdae.model:build_cdae", task="ish_tf.families.cdae.task:CDAETask",
    inputs=_GRAY, outputs=("code", "reconstruction"), pixels_signature="encode_images",
    quickstart="ish_tf.families.cdae.quickstart:run_quickstart",
    tiny="ish_tf.families.cdae.testing:tiny",
    description="convolutional denoising autoencoder with pooling switches "
                "(Cohen, David & Netanyahu 2017)"))
register_family(FamilySpec(
    name="cdae_supervised", config="ish_tf.families.cdae.config:CdaeConfig",
    builder="ish_tf.families.cdae.model:build_cdae_supervised",
    task="ish_tf.families.cdae.task:CDAESupervisedTask", inputs=_GRAY,
    outputs=("probabilities", "code"), pixels_signature="classify_images", flag_prefix="cdae",
    tiny="ish_tf.families.cdae.testing:tiny_supervised",
    description="the CDAE's encoder fine-tuned to predict GO terms"))
register_family(FamilySpec(
    name="unet", config="ish_tf.families.unet.config:UnetConfig",
    builder="ish_tf.families.unet.model:build_unet_model",
    task="ish_tf.families.unet.task:UNetTask", inputs=_RGB, outputs=("mask",),
    pixels_signature="segment_images", tiny="ish_tf.families.unet.testing:tiny",
    description="U-Net tissue segmenter trained on image/mask pairs"))
register_family(FamilySpec(
    name="ish_cnn", config="ish_tf.families.ish_cnn.config:IshCnnConfig",
    builder="ish_tf.families.ish_cnn.model:build_ish_cnn",
    task="ish_tf.families.ish_cnn.task:IshCnnTask", inputs=_RGB, outputs=("probabilities",),
    pixels_signature="classify_images",
    quickstart="ish_tf.families.ish_cnn.quickstart:run_quickstart",
    tiny="ish_tf.families.ish_cnn.testing:tiny",
    description="morphology from spatial-expression labels, Dice on a second animal "
                "(Andersson et al. 2020)"))
register_family(FamilySpec(
    name="cic", config="ish_tf.families.cic.config:CicConfig",
    builder="ish_tf.families.cic.model:build_cic", task="ish_tf.families.cic.task:CicTask",
    inputs=InputSpec.vector(), outputs=("code", "reconstruction"),
    pixels_signature="encode_vectors", tiny="ish_tf.families.cic.testing:tiny",
    quickstart="ish_tf.families.cic.quickstart:run_quickstart",
    description="cell identity codes: dense autoencoder of expression profiles "
                "(Abdolhosseini et al. 2019)"))
register_family(FamilySpec(
    name="cic_classifier", config="ish_tf.families.cic.config:CicConfig",
    builder="ish_tf.families.cic.model:build_cic_classifier",
    task="ish_tf.families.cic.task:CicClassifierTask", inputs=InputSpec.vector(),
    outputs=("code", "reconstruction", "probabilities"), pixels_signature="encode_vectors",
    flag_prefix="cic", tiny="ish_tf.families.cic.testing:tiny_classifier",
    description="the cell-identity-code autoencoder with a cell-type softmax on its code, "
                "trained jointly"))
register_family(FamilySpec(
    name="fluorescence", config="ish_tf.families.fluorescence.config:FluorescenceConfig",
    builder="ish_tf.families.fluorescence.model:build_fluorescence_model",
    task="ish_tf.families.fluorescence.task:FluorescenceTask", inputs=InputSpec.image(6),
    outputs=("embedding", "probabilities", "logits"), pixels_signature="classify_images",
    hypermodel="ish_tf.families.fluorescence.hypermodel:FluorescenceHyperModel",
    tiny="ish_tf.families.fluorescence.testing:tiny",
    description="siRNA classes of multi-channel fluorescence sites, normalised per plate: "
                "ArcFace or softmax head (DeepNoise, supervised)"))
register_family(FamilySpec(
    name="mean_teacher", config="ish_tf.families.fluorescence.config:FluorescenceConfig",
    builder="ish_tf.families.fluorescence.model:build_fluorescence_model",
    task="ish_tf.families.fluorescence.task:MeanTeacherTask", inputs=InputSpec.image(6),
    outputs=("embedding", "probabilities", "logits"), pixels_signature="classify_images",
    flag_prefix="fluorescence", tiny="ish_tf.families.fluorescence.testing:tiny_mean_teacher",
    hypermodel="ish_tf.families.fluorescence.hypermodel:FluorescenceHyperModel",
    quickstart="ish_tf.families.fluorescence.quickstart:run_quickstart",
    description="the fluorescence network as student and EMA teacher, with unlabelled wells "
                "of held-out experiments (DeepNoise mean teacher)"))

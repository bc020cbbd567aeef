"""Model families: a registry of builders `build(ModelConfig) -> keras.Model`.

Importing this package is cheap (no TensorFlow); builders are imported on first use.
Every built model takes images (B, R, R, 3) float32 in [0, 255] and carries its own
input preprocessing, so a saved `model.keras` can be served on raw pixels.

Add a family with `register_model("name", "module.path:function")` (lazy) or the
`@register_model_builder("name")` decorator, plus a `Task` in `ish_tf.train.tasks`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from typing import Any

# name -> "module:function" (resolved lazily) or the builder itself.
_BUILDERS: dict[str, str | Callable[..., Any]] = {
    "triplet": "ish_tf.models.triplet:build_triplet_model",
    "cdae": "ish_tf.models.cdae:build_cdae",
    "cdae_supervised": "ish_tf.models.cdae:build_cdae_supervised",
    "unet": "ish_tf.models.unet:build_unet_model",
    "ish_cnn": "ish_tf.models.ish_cnn:build_ish_cnn",
}


@dataclasses.dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved as RUN/model_config.json.

    Attributes:
      model: registry key of the builder ("triplet").
      backbone: "resnet50" or "small_cnn".
      backbone_weights: "imagenet", "none" or a path to a weights file.
      input_size: side R of the square input images.
      embedding_dim: embedding width D.
      head_units: hidden width of the head (1024 in the reference).
      l2_normalize: L2-normalise embeddings.
      head_batch_norm: "batch", "sync" (synchronised across replicas) or "none".
      seed: initialiser seed (None: Keras' global seed state).
      options: family-specific settings (e.g. CDAE depth/filters/code size, ISH CNN
        classes), JSON-serialisable; each family documents its keys and fills them
        from its own flag section through `FAMILY_OPTIONS`.
    """

    model: str = "triplet"
    backbone: str = "resnet50"
    backbone_weights: str = "imagenet"
    input_size: int = 256
    embedding_dim: int = 128
    head_units: int = 1024
    l2_normalize: bool = False
    head_batch_norm: str = "batch"
    seed: int | None = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def option(self, key: str, default: Any = None) -> Any:
        """A family-specific setting from `options`, or `default`."""
        return self.options.get(key, default)

    def to_json(self) -> str:
        """The config as JSON text (for RUN/model_config.json)."""
        return json.dumps({"builder": self.model, "config": dataclasses.asdict(self)},
                          indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        """Parses `to_json` output; unknown keys raise so stale files are noticed.

        Raises:
          ValueError: the text is not a model config.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or "config" not in data:
            raise ValueError("not a model_config.json: missing 'config'")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data["config"]) - known
        if unknown:
            raise ValueError(f"model_config.json has unknown keys {sorted(unknown)}")
        return cls(**data["config"])


# name -> function(flag values) -> dict of family options; lets each family's flag
# section (ish_tf/flags.py) fill ModelConfig.options without touching the others.
FAMILY_OPTIONS: dict[str, str | Callable[..., dict[str, Any]]] = {
    "cdae": "ish_tf.flags:cdae_options",
    "cdae_supervised": "ish_tf.flags:cdae_options",
    "unet": "ish_tf.flags:unet_options",
    "ish_cnn": "ish_tf.flags:ish_cnn_options",
}


def family_options(name: str, flag_values: Any) -> dict[str, Any]:
    """The options of family `name` read from flag values ({} for families without any)."""
    fn = FAMILY_OPTIONS.get(name)
    if fn is None:
        return {}
    if isinstance(fn, str):
        module, _, attr = fn.partition(":")
        fn = getattr(importlib.import_module(module), attr)
    return dict(fn(flag_values))


def register_model(name: str, builder: str | Callable[..., Any]) -> None:
    """Registers a builder `fn(ModelConfig) -> keras.Model` under `name`.

    Args:
      name: the `--model` value.
      builder: the function, or "package.module:function" imported on first use.
    """
    _BUILDERS[name] = builder


def register_model_builder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of `register_model`."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        register_model(name, fn)
        return fn

    return wrap


def model_names() -> list[str]:
    """Registered model family names."""
    return sorted(_BUILDERS)


def get_builder(name: str) -> Callable[..., Any]:
    """Returns the builder registered as `name`.

    Raises:
      ValueError: no such model family.
    """
    if name not in _BUILDERS:
        raise ValueError(f"--model={name!r} is not one of {model_names()}")
    builder = _BUILDERS[name]
    if isinstance(builder, str):
        module, _, attr = builder.partition(":")
        builder = getattr(importlib.import_module(module), attr)
        _BUILDERS[name] = builder
    return builder


def build_model(config: ModelConfig):
    """Builds the keras.Model described by `config` (see `ModelConfig`)."""
    return get_builder(config.model)(config)


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

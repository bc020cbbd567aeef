"""The TFRecord schema of record sets: feature keys, `make_example`, parsing and decoding.

One record = one example of a record set: an image (an S×S window of a section image
resized to an R×R patch, stored encoded as JPEG or PNG) or, later, a vector, in a
`tf.train.Example` with the features in `FEATURE_KEYS`. Writers and readers both
import this module; where shards, offsets and the index (`index.json`, `genes.csv`)
live is `ish_tf.data.shards`.

TensorFlow is imported lazily so that building the schema does not pay for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Feature key -> (kind, default). kind: "bytes" | "int" | "float_list".
# A default of `None` marks a required field.
_SCHEMA: dict[str, tuple[str, Any]] = {
    "image/encoded": ("bytes", None),
    "image/format": ("bytes", ""),        # "" -> sniffed from the encoded bytes
    "image/height": ("int", None),
    "image/width": ("int", None),
    "image_id": ("int", None),
    "patch_index": ("int", 0),
    "x": ("int", 0),
    "y": ("int", 0),
    "source_size": ("int", -1),           # -1 -> image/height (no resize)
    "gene_symbol": ("bytes", None),
    "gene_index": ("int", None),
    "entrez_id": ("int", -1),
    "donor_id": ("bytes", ""),
    "donor_index": ("int", -1),
    "region": ("bytes", ""),
    "study": ("bytes", ""),
    "label": ("int", -1),
    "vector": ("float_list", ()),
}

#: Every feature of a patch record, defined once.
FEATURE_KEYS: tuple[str, ...] = tuple(_SCHEMA)

#: Scalar features (everything except the encoded image and the variable-length vector).
SCALAR_KEYS: tuple[str, ...] = tuple(
    k for k, (kind, _) in _SCHEMA.items() if kind != "float_list" and k != "image/encoded")

# Python-identifier aliases so callers can write make_example(image_encoded=...).
_ALIASES = {k.replace("/", "_"): k for k in FEATURE_KEYS if "/" in k}
_ALIASES.update({"encoded": "image/encoded", "format": "image/format",
                 "height": "image/height", "width": "image/width"})

IMAGE_FORMATS = ("jpeg", "png")


class RecordsError(ValueError):
    """A records directory, index or record that is missing or malformed; the message names it."""


# --------------------------------------------------------------------------- examples
def _sniff_format(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    raise RecordsError("image/encoded is neither JPEG nor PNG (unknown magic bytes); "
                       "pass image/format explicitly or encode as jpeg/png")


def _as_bytes(key: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (str, np.str_)):
        return str(value).encode("utf-8")
    raise RecordsError(f"feature '{key}' must be bytes or str, got {type(value).__name__}")


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and float(value).is_integer():
            return int(value)
        raise RecordsError(f"feature '{key}' must be an integer, got {value!r}")
    return int(value)


def make_example(**fields: Any) -> bytes:
    """Builds one serialized `tf.train.Example` patch record (pure protobuf, no graph).

    Keys are the names in `FEATURE_KEYS`; because `image/...` keys are not Python
    identifiers, `image_encoded`, `image_format`, `image_height`, `image_width` (or
    `encoded`, `format`, `height`, `width`) are accepted too, as is
    `make_example(**{"image/encoded": ...})`.

    Required: image/encoded, image/height, image/width, image_id, gene_symbol,
    gene_index. Defaults: image/format sniffed from the bytes; patch_index, x, y 0;
    source_size = image/height; entrez_id, donor_index, label -1; donor_id, region,
    study ""; vector empty.

    Args:
      **fields: feature values: bytes/str for bytes features, ints for int64
        features, a sequence of floats (or 1-D array) for `vector`.

    Returns:
      The serialized Example.

    Raises:
      RecordsError: an unknown key, a missing required key, or a value of the wrong type.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    values: dict[str, Any] = {}
    for name, value in fields.items():
        key = _ALIASES.get(name, name)
        if key not in _SCHEMA:
            raise RecordsError(f"unknown feature '{name}'; known: {', '.join(FEATURE_KEYS)}")
        if key in values:
            raise RecordsError(f"feature '{key}' given twice (as '{name}' and an alias)")
        values[key] = value
    missing = [k for k, (_, default) in _SCHEMA.items() if default is None and k not in values]
    if missing:
        raise RecordsError(f"make_example: missing required feature(s): {', '.join(missing)}")

    encoded = _as_bytes("image/encoded", values["image/encoded"])
    fmt = _as_bytes("image/format", values.get("image/format", b"")).decode().lower()
    if fmt in ("", "jpg"):
        fmt = _sniff_format(encoded) if not fmt else "jpeg"
    if fmt not in IMAGE_FORMATS:
        raise RecordsError(f"feature 'image/format' must be one of {IMAGE_FORMATS}, got {fmt!r}")
    values["image/encoded"], values["image/format"] = encoded, fmt
    if _as_int("source_size", values.get("source_size", -1)) < 0:
        values["source_size"] = values["image/height"]

    feature = {}
    for key, (kind, default) in _SCHEMA.items():
        value = values.get(key, default)
        if kind == "bytes":
            feature[key] = feature_pb2.Feature(
                bytes_list=feature_pb2.BytesList(value=[_as_bytes(key, value)]))
        elif kind == "int":
            feature[key] = feature_pb2.Feature(
                int64_list=feature_pb2.Int64List(value=[_as_int(key, value)]))
        else:
            try:
                floats = np.asarray(value, dtype=np.float32).reshape(-1).tolist()
            except (TypeError, ValueError) as e:
                raise RecordsError(f"feature 'vector' must be a sequence of floats: {e}") from e
            feature[key] = feature_pb2.Feature(float_list=feature_pb2.FloatList(value=floats))
    example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
    # Deterministic: features in key order. The default map order differs between
    # processes, so the same records would give different shard bytes from run to run.
    return example.SerializeToString(deterministic=True)


def feature_spec(keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The `tf.io.parse_single_example` spec of the given keys (default: all).

    Raises:
      RecordsError: an unknown key.
    """
    import tensorflow as tf

    spec = {}
    for key in FEATURE_KEYS if keys is None else keys:
        if key not in _SCHEMA:
            raise RecordsError(f"unknown feature '{key}'; known: {', '.join(FEATURE_KEYS)}")
        kind, default = _SCHEMA[key]
        if kind == "bytes":
            spec[key] = tf.io.FixedLenFeature([], tf.string, default_value=default)
        elif kind == "int":
            spec[key] = tf.io.FixedLenFeature([], tf.int64, default_value=default)
        else:
            # Variable length (possibly empty): a RaggedFeature parses to a dense (V,) tensor
            # for a single example.
            spec[key] = tf.io.RaggedFeature(tf.float32)
    return spec


def parse_example(serialized, keys: Iterable[str] | None = None) -> dict:
    """Parses one serialized patch record; usable inside `Dataset.map`.

    Args:
      serialized: scalar tf.string tensor (or bytes).
      keys: features to parse (default: all of `FEATURE_KEYS`); parsing fewer is cheaper.

    Returns:
      Dict feature key -> tensor: scalar tf.string for bytes features, scalar tf.int64
      for int features, `vector` as float32 (V,) with V possibly 0.
    """
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec(keys))


def decode_image(features: Mapping, size: int | None = None):
    """Decodes the patch of a parsed record to uint8 (H, W, 3).

    Args:
      features: dict from `parse_example` holding at least `image/encoded`.
      size: the patch size R when known (from the index), to give the result a static
        (R, R, 3) shape; the decoded size is checked against it.

    Returns:
      uint8 tensor (H, W, 3); grayscale patches are expanded to 3 channels.
    """
    import tensorflow as tf

    image = tf.io.decode_image(features["image/encoded"], channels=3, expand_animations=False)
    if size is not None:
        image = tf.ensure_shape(image, [size, size, 3])
    else:
        image.set_shape([None, None, 3])
    return image

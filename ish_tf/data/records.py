"""The TFRecord schema of record sets: feature keys, `make_example`, parsing and decoding.

One record = one example of a record set, in a `tf.train.Example` with the features
in `FEATURE_KEYS`. What the example holds is the set's input kind (an `InputSpec`,
stored in the set's `index.json`; see `ish_tf.data.shards`):

- ``image`` with 1 or 3 uint8 channels (ISH patches: an S×S window of a section
  image resized to an R×R patch): `image/encoded` JPEG or PNG bytes, exactly as
  always; `image/channels` and `image/dtype` are not written, so these records are
  byte-identical to those of earlier versions;
- ``image`` with any other channel count, or uint16 (fluorescence plates):
  `image/format` = "raw", `image/encoded` the little-endian (H, W, C) pixels, plus
  `image/channels` and `image/dtype`;
- ``vector``: the `vector` feature (D floats) and no image features at all.

Optional features (`OPTIONAL_KEYS`: plate, well, site, cell_type, well_type) are written
only when given, so records that do not set them keep their bytes; fluorescence plate
sites set them.

Every record carries an identity (the label of re-identification: a gene, later a
perturbation or a cell type) and a group (a donor, later a plate or a batch). The
stored keys keep their original names (`gene_symbol`/`gene_index`,
`donor_id`/`donor_index`) so old record sets stay readable; code names the roles
through `IDENTITY_KEY`, `IDENTITY_INDEX_KEY`, `GROUP_KEY`, `GROUP_INDEX_KEY`.

Writers and readers both import this module; shards, offsets and the index
(`index.json`, `genes.csv`) live in `ish_tf.data.shards`.

TensorFlow is imported lazily so that building the schema does not pay for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ish_tf.data.inputs import InputSpec

# Feature key -> (kind, default). kind: "bytes" | "int" | "float_list". Which keys are
# required depends on the input kind (`REQUIRED_KEYS`); the default is what a reader
# gets when a record lacks an optional key.
_SCHEMA: dict[str, tuple[str, Any]] = {
    "image/encoded": ("bytes", ""),
    "image/format": ("bytes", ""),        # "" -> sniffed from the encoded bytes
    "image/height": ("int", 0),
    "image/width": ("int", 0),
    "image/channels": ("int", 0),         # raw images only (0: from the format)
    "image/dtype": ("bytes", ""),         # raw images only ("uint8" | "uint16")
    "image_id": ("int", 0),
    "patch_index": ("int", 0),
    "x": ("int", 0),
    "y": ("int", 0),
    "source_size": ("int", -1),           # -1 -> image/height (no resize)
    "gene_symbol": ("bytes", ""),
    "gene_index": ("int", -1),
    "entrez_id": ("int", -1),
    "donor_id": ("bytes", ""),
    "donor_index": ("int", -1),
    "region": ("bytes", ""),
    "study": ("bytes", ""),
    "label": ("int", -1),
    "vector": ("float_list", ()),
}

#: Every feature of a record, defined once.
FEATURE_KEYS: tuple[str, ...] = tuple(_SCHEMA)

# Optional features: written only when given, so records without them (ISH patches,
# expression vectors) keep exactly their bytes. Fluorescence plate sites
# (`ish_tf.data.plate_records`) set them; a reader asks for them by name
# (`parse_example(keys=FEATURE_KEYS + OPTIONAL_KEYS)`) and gets the default where absent.
_OPTIONAL_SCHEMA: dict[str, tuple[str, Any]] = {
    "plate": ("int", -1),                 # plate number within the experiment (the group)
    "well": ("bytes", ""),                # well on the plate, e.g. B02
    "site": ("int", -1),                  # imaged site within the well
    "cell_type": ("bytes", ""),
    "well_type": ("bytes", ""),           # treatment | positive_control | negative_control
}
#: Features written only when set (plate metadata of fluorescence sites).
OPTIONAL_KEYS: tuple[str, ...] = tuple(_OPTIONAL_SCHEMA)
_ALL_SCHEMA: dict[str, tuple[str, Any]] = {**_SCHEMA, **_OPTIONAL_SCHEMA}

#: Scalar features (everything except the encoded image and the variable-length vector).
SCALAR_KEYS: tuple[str, ...] = tuple(
    k for k, (kind, _) in _SCHEMA.items() if kind != "float_list" and k != "image/encoded")

#: The roles of a record: identity (re-identified across groups; the P×K sampler's
#: classes) and group. The stored keys keep their first family's names.
IDENTITY_KEY = "gene_symbol"
IDENTITY_INDEX_KEY = "gene_index"
GROUP_KEY = "donor_id"
GROUP_INDEX_KEY = "donor_index"
#: What identities and groups are in a set whose index does not say.
DEFAULT_IDENTITY_NAME = "gene"
DEFAULT_GROUP_NAME = "donor"

#: Features of an image; a vector record holds none of them.
IMAGE_KEYS: tuple[str, ...] = ("image/encoded", "image/format", "image/height", "image/width",
                               "image/channels", "image/dtype")
#: Features written only for raw images (so JPEG/PNG records keep their bytes).
RAW_IMAGE_KEYS: tuple[str, ...] = ("image/channels", "image/dtype")

#: Required features by input kind.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "image": ("image/encoded", "image/height", "image/width", "image_id", IDENTITY_KEY,
              IDENTITY_INDEX_KEY),
    "vector": ("vector", "image_id", IDENTITY_KEY, IDENTITY_INDEX_KEY),
}

# Python-identifier aliases so callers can write make_example(image_encoded=...).
_ALIASES = {k.replace("/", "_"): k for k in FEATURE_KEYS if "/" in k}
_ALIASES.update({"encoded": "image/encoded", "format": "image/format",
                 "height": "image/height", "width": "image/width",
                 "channels": "image/channels", "dtype": "image/dtype", "image": "image/encoded"})

IMAGE_FORMATS = ("jpeg", "png")
RAW_FORMAT = "raw"
RAW_DTYPES = ("uint8", "uint16")


class RecordsError(ValueError):
    """A records directory, index or record that is missing or malformed; the message names it."""


# --------------------------------------------------------------------------- input kinds
def stores_raw(channels: int, dtype: str) -> bool:
    """Whether images of this channel count and dtype are stored raw (else JPEG/PNG).

    JPEG and PNG hold 1 or 3 uint8 channels losslessly enough for ISH patches; any
    other channel count, and uint16, is stored as raw bytes.
    """
    return not (dtype == "uint8" and channels in (1, 3))


def input_spec_of(dataset: Mapping | None) -> InputSpec:
    """The input spec of a record set from its dataset info (the `index.json` "dataset").

    Sets written before input kinds were recorded hold 3-channel uint8 images of the
    patch size R: `InputSpec.image(3, R, R)` (R None when unknown).

    Args:
      dataset: `DatasetInfo.to_dict()`, or None.

    Raises:
      RecordsError: the stored spec is invalid.
    """
    stored = (dataset or {}).get("input_spec")
    if stored:
        try:
            return InputSpec.from_dict(dict(stored))
        except (TypeError, ValueError) as e:
            raise RecordsError(f"dataset info: invalid input_spec {stored!r}: {e}") from e
    size = int((dataset or {}).get("patch_size") or 0) or None
    return InputSpec.image(3, size, size)


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


def _check_declared(values: dict, key: str, actual: int | str) -> None:
    """Fills `values[key]` with `actual`, or checks a declared value against it."""
    if key not in values:
        values[key] = actual
        return
    declared = values[key]
    declared = (_as_bytes(key, declared).decode() if isinstance(actual, str)
                else _as_int(key, declared))
    if declared != actual:
        raise RecordsError(f"feature '{key}' is {declared!r} but the image array has {actual!r}")


def _encode_array(values: dict, fmt: str) -> tuple[bytes, str]:
    """Stores an image array: raw bytes, or PNG/JPEG for 1 or 3 uint8 channels."""
    array = np.asarray(values["image/encoded"])
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise RecordsError(f"feature 'image/encoded': an image array must be (H, W) or "
                           f"(H, W, C), got shape {array.shape}")
    if array.dtype.name not in RAW_DTYPES:
        raise RecordsError(f"feature 'image/dtype': image arrays must be one of {RAW_DTYPES}, "
                           f"got {array.dtype.name}")
    h, w, c = array.shape
    _check_declared(values, "image/height", h)
    _check_declared(values, "image/width", w)
    raw = stores_raw(c, array.dtype.name)
    fmt = fmt or (RAW_FORMAT if raw else "png")
    if raw != (fmt == RAW_FORMAT):
        raise RecordsError(
            f"feature 'image/format': a {c}-channel {array.dtype.name} image is stored "
            f"{'raw' if raw else 'as png or jpeg'}, not as {fmt!r}")
    if raw:
        _check_declared(values, "image/channels", c)
        _check_declared(values, "image/dtype", array.dtype.name)
        return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(), fmt
    for key in RAW_IMAGE_KEYS:
        values.pop(key, None)
    import tensorflow as tf

    if fmt == "png":
        return tf.io.encode_png(array).numpy(), fmt
    return tf.io.encode_jpeg(array, quality=95).numpy(), fmt


def _image_features(values: dict) -> int | None:
    """Validates and normalises the image features of `values` in place.

    Returns:
      The image's channel count when known without decoding (an array, a raw image).
    """
    fmt = _as_bytes("image/format", values.get("image/format", b"")).decode().lower()
    fmt = "jpeg" if fmt == "jpg" else fmt
    if fmt and fmt not in IMAGE_FORMATS + (RAW_FORMAT,):
        raise RecordsError(f"feature 'image/format' must be one of "
                           f"{IMAGE_FORMATS + (RAW_FORMAT,)}, got {fmt!r}")
    known_channels = None
    if isinstance(values["image/encoded"], np.ndarray):
        shape = np.shape(values["image/encoded"])
        known_channels = shape[2] if len(shape) == 3 else 1
        encoded, fmt = _encode_array(values, fmt)
    else:
        encoded = _as_bytes("image/encoded", values["image/encoded"])
        fmt = fmt or _sniff_format(encoded)
    if fmt == RAW_FORMAT:
        if "image/channels" not in values:
            raise RecordsError("feature 'image/channels' is required for a raw image "
                               "(image/format 'raw')")
        channels = _as_int("image/channels", values["image/channels"])
        dtype = _as_bytes("image/dtype", values.get("image/dtype", "uint8")).decode()
        if dtype not in RAW_DTYPES:
            raise RecordsError(f"feature 'image/dtype' must be one of {RAW_DTYPES}, got {dtype!r}")
        if channels < 1:
            raise RecordsError(f"feature 'image/channels' must be >= 1, got {channels}")
        h, w = (_as_int(k, values[k]) for k in ("image/height", "image/width"))
        expected = h * w * channels * np.dtype(dtype).itemsize
        if len(encoded) != expected:
            raise RecordsError(f"feature 'image/encoded' holds {len(encoded)} bytes, but a raw "
                               f"{h}x{w}x{channels} {dtype} image takes {expected}")
        values["image/channels"], values["image/dtype"] = channels, dtype
    else:
        channels = _as_int("image/channels", values.pop("image/channels", 0))
        dtype = _as_bytes("image/dtype", values.pop("image/dtype", "")).decode()
        if channels not in (0, 1, 3) or dtype not in ("", "uint8"):
            raise RecordsError(f"feature 'image/format' {fmt!r} holds 1 or 3 uint8 channels; "
                               f"got image/channels {channels}, image/dtype {dtype!r} "
                               "(store these raw)")
    values["image/encoded"], values["image/format"] = encoded, fmt
    return channels if fmt == RAW_FORMAT else known_channels


def _check_against_spec(values: dict, spec: InputSpec, channels: int | None) -> None:
    if spec.kind == "vector":
        n = len(values["vector"])
        if spec.dim and n != spec.dim:
            raise RecordsError(f"feature 'vector' has {n} values but the set's input spec "
                               f"says dim {spec.dim}")
        return
    raw = values["image/format"] == RAW_FORMAT
    if raw != stores_raw(spec.channels, spec.dtype):
        raise RecordsError(
            f"feature 'image/format' is {values['image/format']!r} but the set's input spec "
            f"({spec.describe()}) is stored {'raw' if not raw else 'as png or jpeg'}")
    if channels is not None and channels != spec.channels:
        raise RecordsError(f"feature 'image/channels': the image has {channels} channel(s) but "
                           f"the set's input spec says {spec.channels}")
    if raw and values["image/dtype"] != spec.dtype:
        raise RecordsError(f"feature 'image/dtype' is {values['image/dtype']!r} but the "
                           f"set's input spec says {spec.dtype!r}")
    for key, want in (("image/height", spec.height), ("image/width", spec.width)):
        if want is not None and _as_int(key, values[key]) != want:
            raise RecordsError(f"feature '{key}' is {values[key]} but the set's input spec "
                               f"says {want}")


def make_example(*, input_spec: InputSpec | None = None, **fields: Any) -> bytes:
    """Builds one serialized `tf.train.Example` record (pure protobuf, no graph).

    Keys are the names in `FEATURE_KEYS`; because `image/...` keys are not Python
    identifiers, `image_encoded`, `image_format`, `image_height`, `image_width`,
    `image_channels`, `image_dtype` (or `encoded`/`image`, `format`, `height`, `width`,
    `channels`, `dtype`) are accepted too, as is `make_example(**{"image/encoded": ...})`.

    The image is either encoded bytes (JPEG/PNG, or raw little-endian pixels with
    image/format "raw" and image/channels, image/dtype) or a uint8/uint16 array
    (H, W[, C]): 1 or 3 uint8 channels are encoded as PNG (or JPEG with
    image/format "jpeg"), anything else is stored raw. Declared height, width,
    channels and dtype are checked against the array.

    Required (`REQUIRED_KEYS`): for an image record image/encoded, image/height,
    image/width (taken from an array), image_id, gene_symbol, gene_index; for a vector
    record vector, image_id, gene_symbol, gene_index. Defaults: image/format sniffed
    from the bytes; patch_index, x, y 0; source_size = image/height (-1 for vectors);
    entrez_id, donor_index, label -1; donor_id, region, study ""; vector empty.

    Args:
      input_spec: the set's input kind; when given, the record is checked against it
        (vector length, channels, dtype, height, width). Without it, the kind is
        "vector" when a vector and no image is given, else "image".
      **fields: feature values: bytes/str for bytes features, ints for int64
        features, a sequence of floats (or 1-D array) for `vector`, bytes or an array
        for the image.

    Returns:
      The serialized Example. JPEG/PNG image records hold exactly the features they
      always did (same bytes for the same inputs); raw images add image/channels and
      image/dtype; vector records hold no image feature.

    Raises:
      RecordsError: an unknown key, a missing required key, a value of the wrong type,
        or a record that disagrees with itself or with `input_spec`; the message names
        the feature.
    """
    from tensorflow.core.example import example_pb2, feature_pb2

    values: dict[str, Any] = {}
    for name, value in fields.items():
        key = _ALIASES.get(name, name)
        if key not in _ALL_SCHEMA:
            raise RecordsError(f"unknown feature '{name}'; known: "
                               f"{', '.join(FEATURE_KEYS + OPTIONAL_KEYS)}")
        if key in values:
            raise RecordsError(f"feature '{key}' given twice (as '{name}' and an alias)")
        values[key] = value
    if input_spec is not None:
        kind = input_spec.kind
    else:
        kind = "vector" if "vector" in values and "image/encoded" not in values else "image"
    missing = [k for k in REQUIRED_KEYS[kind] if k not in values
               and not (k in ("image/height", "image/width")
                        and isinstance(values.get("image/encoded"), np.ndarray))]
    if missing:
        raise RecordsError(f"make_example: missing required feature(s) of a {kind} record: "
                           f"{', '.join(missing)}")
    if "vector" in values:
        try:
            values["vector"] = np.asarray(values["vector"], dtype=np.float32).reshape(-1).tolist()
        except (TypeError, ValueError) as e:
            raise RecordsError(f"feature 'vector' must be a sequence of floats: {e}") from e
    if kind == "vector":
        extra = [k for k in IMAGE_KEYS if k in values]
        if extra:
            raise RecordsError(f"a vector record holds no image; got {', '.join(extra)}")
        written = [k for k in FEATURE_KEYS if k not in IMAGE_KEYS]
    else:
        channels = _image_features(values)
        if _as_int("source_size", values.get("source_size", -1)) < 0:
            values["source_size"] = values["image/height"]
        raw = values["image/format"] == RAW_FORMAT
        written = [k for k in FEATURE_KEYS if raw or k not in RAW_IMAGE_KEYS]
    if input_spec is not None:
        _check_against_spec(values, input_spec, None if kind == "vector" else channels)
    written += [k for k in OPTIONAL_KEYS if k in values]

    feature = {}
    for key in written:
        kind_of, default = _ALL_SCHEMA[key]
        value = values.get(key, default)
        if kind_of == "bytes":
            feature[key] = feature_pb2.Feature(
                bytes_list=feature_pb2.BytesList(value=[_as_bytes(key, value)]))
        elif kind_of == "int":
            feature[key] = feature_pb2.Feature(
                int64_list=feature_pb2.Int64List(value=[_as_int(key, value)]))
        else:
            feature[key] = feature_pb2.Feature(
                float_list=feature_pb2.FloatList(value=list(value)))
    example = example_pb2.Example(features=feature_pb2.Features(feature=feature))
    # Deterministic: features in key order. The default map order differs between
    # processes, so the same records would give different shard bytes from run to run.
    return example.SerializeToString(deterministic=True)


def feature_spec(keys: Iterable[str] | None = None, kind: str = "image") -> dict[str, Any]:
    """The `tf.io.parse_single_example` spec of the given keys (default: all).

    Args:
      keys: features to parse (default: `FEATURE_KEYS`; the `OPTIONAL_KEYS` only when
        named).
      kind: the set's input kind: its `REQUIRED_KEYS` have no default (a record
        without them fails to parse); the others read as their default when absent.

    Raises:
      RecordsError: an unknown key or input kind.
    """
    import tensorflow as tf

    if kind not in REQUIRED_KEYS:
        raise RecordsError(f"unknown input kind {kind!r}; known: {', '.join(REQUIRED_KEYS)}")
    required = REQUIRED_KEYS[kind]
    spec = {}
    for key in FEATURE_KEYS if keys is None else keys:
        if key not in _ALL_SCHEMA:
            raise RecordsError(f"unknown feature '{key}'; known: "
                               f"{', '.join(FEATURE_KEYS + OPTIONAL_KEYS)}")
        kind_of, default = _ALL_SCHEMA[key]
        default = None if key in required else default
        if kind_of == "bytes":
            spec[key] = tf.io.FixedLenFeature([], tf.string, default_value=default)
        elif kind_of == "int":
            spec[key] = tf.io.FixedLenFeature([], tf.int64, default_value=default)
        else:
            # Variable length (possibly empty): a RaggedFeature parses to a dense (V,) tensor
            # for a single example.
            spec[key] = tf.io.RaggedFeature(tf.float32)
    return spec


def parse_example(serialized, keys: Iterable[str] | None = None, kind: str = "image") -> dict:
    """Parses one serialized record; usable inside `Dataset.map`.

    Args:
      serialized: scalar tf.string tensor (or bytes).
      keys: features to parse (default: all of `FEATURE_KEYS`); parsing fewer is cheaper.
      kind: the set's input kind ("image" or "vector"; see `feature_spec`).

    Returns:
      Dict feature key -> tensor: scalar tf.string for bytes features, scalar tf.int64
      for int features, `vector` as float32 (V,) with V possibly 0.
    """
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, feature_spec(keys, kind))


def image_keys(spec: InputSpec) -> list[str]:
    """The features `decode_image` needs for images of `spec`."""
    if stores_raw(spec.channels, spec.dtype) and (spec.height is None or spec.width is None):
        return ["image/encoded", "image/height", "image/width"]
    return ["image/encoded"]


def decode_image(features: Mapping, size: int | None = None, spec: InputSpec | None = None):
    """Decodes the image of a parsed record to (H, W, C) of the set's dtype.

    Args:
      features: dict from `parse_example` holding at least `image/encoded` (and, for raw
        images of a spec without a fixed size, `image/height` and `image/width`;
        see `image_keys`).
      size: the patch size R when known (from the index), to give the result a static
        (R, R, C) shape; the decoded size is checked against it. Used where the spec
        fixes no size.
      spec: the set's input spec (default: 3-channel uint8 images, the ISH patches).

    Returns:
      uint8 or uint16 tensor (H, W, C) with C = spec.channels; grayscale JPEG/PNG
      patches are expanded to 3 channels when C = 3.
    """
    import tensorflow as tf

    if spec is None:
        spec = InputSpec.image(3, size, size)
    elif spec.height is None and size is not None:
        spec = dataclasses.replace(spec, height=size, width=size)
    channels = spec.channels
    if not stores_raw(channels, spec.dtype):
        image = tf.io.decode_image(features["image/encoded"], channels=channels,
                                   expand_animations=False)
        if spec.height is not None:
            image = tf.ensure_shape(image, [spec.height, spec.width, channels])
        else:
            image.set_shape([None, None, channels])
        return image
    flat = tf.io.decode_raw(features["image/encoded"], tf.as_dtype(spec.dtype),
                            little_endian=True)
    if spec.height is not None and spec.width is not None:
        return tf.reshape(flat, [spec.height, spec.width, channels])
    shape = tf.stack([tf.cast(features["image/height"], tf.int32),
                      tf.cast(features["image/width"], tf.int32), channels])
    image = tf.reshape(flat, shape)
    image.set_shape([None, None, channels])
    return image


def decode_vector(features: Mapping, dim: int | None = None):
    """The vector of a parsed record as float32 (D,).

    Args:
      features: dict from `parse_example` holding `vector`.
      dim: D when known (from the set's spec), for a static shape; checked.
    """
    import tensorflow as tf

    vector = tf.convert_to_tensor(features["vector"], tf.float32)
    if dim:
        return tf.ensure_shape(vector, [dim])
    vector.set_shape([None])
    return vector

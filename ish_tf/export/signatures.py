"""What an export takes, by input kind: the input spec and the in-graph decoders.

An export serves one `InputSpec` (`ish_tf.data.inputs`):

======================  ==========================================  ====================
input kind              `serving_default` takes                     decoded signature
======================  ==========================================  ====================
image, 1 or 3 uint8 C   `image_bytes` tf.string (B,) JPEG/PNG       `images` float32
                                                                    (B, H, W, C)
image, other C / uint16 `images` float32 (B, H, W, C) (raw pixels:  same
                        JPEG/PNG cannot hold 6 channels or 16 bits)
vector                  `vectors` float32 (B, D)                    same
======================  ==========================================  ====================

and every export has `tf_example`: `examples` tf.string (B,) serialized records of
the one record schema (`ish_tf.data.records`), parsed and decoded in the graph by the
same functions the readers use (`records.parse_example`, `records.decode_image`,
`records.decode_vector`).

TensorFlow is imported lazily.
"""

from __future__ import annotations

import dataclasses

from ish_tf.data.inputs import InputSpec

BYTES_INPUT = "image_bytes"
PIXELS_INPUT = "images"
VECTORS_INPUT = "vectors"
EXAMPLES_INPUT = "examples"
TF_EXAMPLE = "tf_example"
#: Dtypes a stored image may have; the tf_example signature accepts any of them.
_STORED_DTYPES = ("uint8", "uint16")
# Features the tf_example signature reads from an image record.
_IMAGE_FEATURES = ("image/encoded", "image/height", "image/width", "image/format",
                   "image/channels", "image/dtype")


class InputSpecError(ValueError):
    """A model input and an input spec that do not fit each other."""


def takes_image_bytes(spec: InputSpec) -> bool:
    """Whether `serving_default` takes encoded JPEG/PNG bytes (1 or 3 uint8 channels)."""
    from ish_tf.data import records

    return spec.kind == "image" and not records.stores_raw(spec.channels, spec.dtype)


def model_input(model) -> tuple[int | None, ...]:
    """Shape of the single input of a Keras model, without the batch axis.

    Raises:
      InputSpecError: no input or several inputs.
    """
    inputs = model.inputs if getattr(model, "inputs", None) else None
    if not inputs or len(inputs) != 1:
        raise InputSpecError(f"model {model.name!r}: export needs exactly one input, "
                             f"got {0 if not inputs else len(inputs)}")
    return tuple(None if d is None else int(d) for d in tuple(inputs[0].shape)[1:])


def resolve_input_spec(model, spec: InputSpec | None = None,
                       family_spec: InputSpec | None = None) -> InputSpec:
    """The complete input spec of an export: sizes from the model, kind from the spec.

    Args:
      model: keras.Model with one input: (B, H, W, C) images or (B, D) vectors, static
        sizes.
      spec: the spec to serve (an open size or dimension is taken from the model);
        None: derived from the model input (rank 4 -> image with its channels, rank 2
        -> vector), with the stored dtype of `family_spec` when that is of the same
        kind and channel count, else uint8 for images.
      family_spec: the family's registered `InputSpec`, if any.

    Returns:
      An `InputSpec` with height, width and channels (images) or dim (vectors) set.

    Raises:
      InputSpecError: a model input that is neither, dynamic sizes, or a spec that
        disagrees with the model.
    """
    shape = model_input(model)
    if len(shape) == 3 and all(d is not None for d in shape):
        derived = InputSpec.image(shape[2], shape[0], shape[1])
        if (family_spec is not None and family_spec.kind == "image"
                and family_spec.channels == shape[2]):
            derived = dataclasses.replace(derived, dtype=family_spec.dtype)
    elif len(shape) == 1 and shape[0] is not None:
        derived = InputSpec.vector(shape[0])
    else:
        raise InputSpecError(f"model {model.name!r}: input shape {(None,) + shape} is neither "
                             "images (B, H, W, C) nor vectors (B, D) with a static size; "
                             "build the model with a fixed input size")
    if spec is None:
        return derived
    if spec.kind != derived.kind:
        raise InputSpecError(f"model {model.name!r}: input {(None,) + shape} takes "
                             f"{derived.kind}s but the input spec is {spec.describe()}")
    if spec.kind == "vector":
        if spec.dim and spec.dim != derived.dim:
            raise InputSpecError(f"model {model.name!r}: input dimension {derived.dim} but the "
                                 f"input spec says {spec.dim}")
        return dataclasses.replace(spec, dim=derived.dim)
    for name, want, have in (("channels", spec.channels, derived.channels),
                             ("height", spec.height, derived.height),
                             ("width", spec.width, derived.width)):
        if want is not None and want != have:
            raise InputSpecError(f"model {model.name!r}: input {name} {have} but the input "
                                 f"spec ({spec.describe()}) says {want}")
    return dataclasses.replace(spec, height=derived.height, width=derived.width)


#: How far (as a factor per side) a served image may be from the model's input size and
#: still be resized to it, under the default `--serving_resize=near`.
MAX_SERVING_SCALE = 2.0
#: `--serving_resize` choices: near (resize within MAX_SERVING_SCALE, reject the rest)
#: or any (resize whatever comes, e.g. a whole section squashed to one patch).
SERVING_RESIZE = ("near", "any")


def fit_image(image, height: int, width: int, channels: int,
              max_scale: float | None = None):
    """float32 (h, w, C) -> (H, W, C): bilinear antialiased resize only when the size
    differs (so an image of the right size passes bit for bit).

    Args:
      max_scale: when given, an image whose height or width is more than this factor
        away from the input size (larger or smaller) is rejected with an
        InvalidArgumentError naming both sizes, instead of being squashed.
    """
    import tensorflow as tf

    if max_scale:
        hw = tf.cast(tf.shape(image)[:2], tf.float32)
        want = tf.constant([height, width], tf.float32)
        near = tf.reduce_all((hw <= want * max_scale) & (hw * max_scale >= want))
        check = tf.debugging.Assert(near, [
            f"image size (height, width) is more than {max_scale:g}x away from the model's "
            f"input {height}x{width}; send patches of about that size (or tile the image), "
            "or export with --serving_resize=any to resize any size:", tf.shape(image)[:2]])
        with tf.control_dependencies([check]):
            image = tf.identity(image)
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [height, width]))
    image = tf.cond(same, lambda: image,
                    lambda: tf.image.resize(image, [height, width], method="bilinear",
                                            antialias=True))
    return tf.ensure_shape(image, [height, width, channels])


def decode_record_image(serialized, spec: InputSpec):
    """One serialized image record -> float32 (H, W, C) of `spec`'s size.

    Parsed with `records.parse_example` and decoded with `records.decode_image`, as
    the readers do: JPEG/PNG or raw pixels of either stored dtype (chosen by the
    record's image/dtype) and any channel count; values are cast to float32 unscaled
    (as the training reader does) and resized when stored at another size.

    Raises (when run):
      InvalidArgumentError: a record that is not an image of `spec.channels` channels.
    """
    import tensorflow as tf

    from ish_tf.data import records

    channels = spec.channels
    feats = records.parse_example(serialized, _IMAGE_FEATURES, "image")

    def decode_as(dtype: str):
        # No size in the spec: raw images take theirs from image/height, image/width.
        stored = InputSpec.image(channels, None, None, dtype)
        return lambda: tf.cast(records.decode_image(feats, spec=stored), tf.float32)

    image = tf.case([(tf.equal(feats["image/dtype"], d), decode_as(d))
                     for d in _STORED_DTYPES if d != "uint8"], default=decode_as("uint8"))
    stored_channels = tf.where(tf.equal(feats["image/format"], records.RAW_FORMAT),
                               feats["image/channels"], tf.constant(channels, tf.int64))
    check = tf.debugging.assert_equal(
        stored_channels, tf.constant(channels, tf.int64),
        message=f"tf_example: the record's raw image does not have {channels} channels")
    with tf.control_dependencies([check]):
        image = tf.identity(image)
    return fit_image(image, spec.height, spec.width, channels)


def decode_records(serialized, spec: InputSpec):
    """A batch of serialized records -> the model's input.

    Args:
      serialized: tf.string (B,) records of the schema in `ish_tf.data.records`.
      spec: the export's complete input spec (`resolve_input_spec`).

    Returns:
      float32 (B, H, W, C) images (see `decode_record_image`) or (B, D) vectors.
    """
    import tensorflow as tf

    from ish_tf.data import records

    if spec.kind == "vector":
        def one(s):
            feats = records.parse_example(s, ["vector"], "vector")
            return records.decode_vector(feats, spec.dim)

        return tf.map_fn(one, serialized,
                         fn_output_signature=tf.TensorSpec([spec.dim], tf.float32))
    return tf.map_fn(lambda s: decode_record_image(s, spec), serialized,
                     fn_output_signature=tf.TensorSpec(
                         [spec.height, spec.width, spec.channels], tf.float32))

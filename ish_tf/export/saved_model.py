"""Versioned TF Serving SavedModels with signatures by input kind.

Layout of an export base `EXPORT/<name>` (the TF Serving model base path)::

    EXPORT/<name>/1/                      # integer versions; TF Serving serves the newest
    EXPORT/<name>/2/saved_model.pb
    EXPORT/<name>/2/variables/...
    EXPORT/<name>/2/assets.extra/ish_tf.json   # sidecar: family, input, outputs, flags, schema
    EXPORT/<name>/2/assets.extra/flags.cfg     # the training run's flagfile (replayable)

Signatures (`saved_model_cli show --dir EXPORT/<name>/2 --all`), chosen by the
export's input kind (an `InputSpec`: given, or derived from the model input; see
`ish_tf.export.signatures`); every one returns a dict of the family's outputs, e.g.
`{"embedding": float32 (B, D)}`:

* images of 1 or 3 uint8 channels (ISH patches, sections):
  - `serving_default`: `image_bytes` tf.string (B,) of JPEG or PNG files. Decoding,
    the resize to the model's input size (bilinear, antialiased, only when the size
    differs) and the cast to float32 [0, 255] happen inside the graph, so a client
    needs no ish_tf code. The input size is in the sidecar ("input_size") and the
    signature's description; by default (`serving_resize="near"`) an image more than
    `MAX_SERVING_SCALE` (2x) larger or smaller than it is rejected (InvalidArgumentError
    naming both sizes) rather than squashed: a whole 1600x1200 section sent to a 64-px
    patch model is an error, not an embedding. `serving_resize="any"` resizes any size;
  - the family's pixel signature (`embed_images` for triplet): `images` float32
    (B, H, W, C) in [0, 255] (skips decoding; for speed and tests);
* images of any other channel count, or uint16 (fluorescence plates): JPEG/PNG
  cannot hold them, so `serving_default` takes the raw pixels, `images` float32
  (B, H, W, C) (the stored values, unscaled), as does the family's pixel signature;
* vectors (expression profiles): `serving_default` (and the family's decoded-input
  signature, `predict_vectors` for families that name none) takes `vectors` float32
  (B, D);
* every kind: `tf_example`: `examples` tf.string (B,) serialized records of the one
  record schema (`ish_tf.data.records`), parsed and decoded in the graph with the
  readers' own functions: JPEG/PNG or raw images of any channel count and either
  stored dtype, cast to float32 unscaled and resized like `serving_default` when
  stored at another size; or vectors.

Each model family declares its output names in its registry entry (`ish_tf.families`).
The SavedModel is written by `keras.export.ExportArchive` (which tracks the model's
variables and sets `serving_default`) into a hidden temporary directory beside the
versions, the sidecar is added, and the directory is renamed to its version number
only when complete: a crash never leaves a half-written version that TF Serving
(which ignores non-integer names) or `latest_version` would pick up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ish_tf import fs
from ish_tf.data.inputs import InputSpec
from ish_tf.export.signatures import (
    BYTES_INPUT,
    EXAMPLES_INPUT,
    MAX_SERVING_SCALE,
    PIXELS_INPUT,
    SERVING_RESIZE,
    TF_EXAMPLE,
    VECTORS_INPUT,
    InputSpecError,
    decode_records,
    fit_image,
    resolve_input_spec,
    takes_image_bytes,
)
from ish_tf.io_utils import atomic_write_text

SIDECAR_DIR = "assets.extra"
SIDECAR_NAME = "ish_tf.json"
FLAGFILE_NAME = "flags.cfg"
# 2: input_spec, input_kind, signature_names and tf_example added (all version-1 keys kept).
SIDECAR_FORMAT = 2
SERVING_DEFAULT = "serving_default"
_TMP_PREFIX = ".export-"
_TMP_SUFFIX = ".tmp"
_TRASH_PREFIX = ".replaced-"
# Scratch directories beside the versions carry their creator's pid: ".export-PID-..." or
# ".replaced-PID-VERSION".
_SCRATCH_RE = re.compile(rf"(?:{re.escape(_TMP_PREFIX)}|{re.escape(_TRASH_PREFIX)})(\d+)-.*")


class ExportError(ValueError):
    """A model or export directory that cannot be exported to or read; names the path."""


def family_outputs(family: str, outputs: Sequence[str] | None = None) -> tuple[tuple[str, ...], str]:
    """(output names, pixels-signature name) of a registered family (`ish_tf.families`).

    Args:
      family: the family name.
      outputs: names given explicitly instead of the family's (any family name then).

    Raises:
      ExportError: an unknown family and no explicit outputs.
    """
    from ish_tf.families import family_names, get_family

    if family in family_names():
        spec = get_family(family)
        return tuple(outputs or spec.outputs), spec.pixels_signature
    if outputs is None:
        raise ExportError(f"unknown model family {family!r} (known: {family_names()}); "
                          "pass outputs=... or register the family in ish_tf.families")
    return tuple(outputs), "predict_images"


# --------------------------------------------------------------------------- versions
def list_versions(export_base: str) -> list[int]:
    """Integer versions present under an export base, ascending (other names ignored)."""
    if not fs.isdir(export_base):
        return []
    return sorted(int(n) for n in fs.listdir(export_base)
                  if n.isdigit() and fs.isdir(fs.join(export_base, n)))


def latest_version(export_base: str) -> int | None:
    """The newest version under `export_base`, or None when there is none."""
    versions = list_versions(export_base)
    return versions[-1] if versions else None


def is_ish_tf_export(version_dir: str) -> bool:
    """Whether a directory is one of ish_tf's own SavedModels: saved_model.pb and its
    `assets.extra/ish_tf.json` sidecar. Only such directories are ever replaced or pruned."""
    return (os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
            and os.path.isfile(os.path.join(version_dir, SIDECAR_DIR, SIDECAR_NAME)))


def exported_versions(export_base: str) -> list[int]:
    """Integer versions under an export base that are ish_tf SavedModels, ascending.

    Numeric folders that are not (a user's notes, another tool's files) are left out:
    rotation never counts them, let alone deletes them.
    """
    return [v for v in list_versions(export_base)
            if is_ish_tf_export(os.path.join(export_base, str(v)))]


def resolve_saved_model(path: str) -> str:
    """A SavedModel directory from a version directory or an export base (newest wins).

    Args:
      path: `EXPORT/<name>/<version>` or `EXPORT/<name>`.

    Returns:
      The version directory holding `saved_model.pb` (of an export base: the newest
      integer version that holds one; numeric folders without a SavedModel are passed over).

    Raises:
      ExportError: neither a SavedModel nor an export base with versions.
    """
    # `path` may be a URL (gs://...: ish_tf.fs), which tf.saved_model.load reads too.
    if fs.isfile(fs.join(path, "saved_model.pb")):
        return path
    versions = [v for v in list_versions(path)
                if fs.isfile(fs.join(path, str(v), "saved_model.pb"))]
    if not versions:
        raise ExportError(f"{path}: neither a SavedModel (no saved_model.pb) nor an export "
                          "base with integer version directories holding one; run bin/export "
                          "first")
    return fs.join(path, str(versions[-1]))


def prune_versions(export_base: str, keep: int, protect: int | None = None) -> list[int]:
    """Deletes all but the newest `keep` of ish_tf's own versions.

    Only directories that `is_ish_tf_export` (saved_model.pb + the ish_tf.json sidecar)
    count and are ever deleted: a numeric folder that is not an ish_tf SavedModel is
    neither counted nor touched.

    Args:
      export_base: the directory holding the versions.
      keep: versions to keep; 0 keeps all.
      protect: a version never deleted (the one just exported, even when an explicit
        version number is older than the kept ones).

    Returns:
      The deleted versions.
    """
    if keep <= 0:
        return []
    versions = exported_versions(export_base)
    doomed = [v for v in (versions[:-keep] if len(versions) > keep else []) if v != protect]
    for v in doomed:
        # Rename first so a half-deleted directory never looks like a servable version.
        trash = os.path.join(export_base, f"{_TRASH_PREFIX}{os.getpid()}-{v}")
        os.replace(os.path.join(export_base, str(v)), trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_exports(export_base: str) -> list[str]:
    """Removes temporary export directories left by killed exporters.

    A temporary directory carries its exporter's pid; it is removed only when that
    process no longer runs, so a concurrent export is left alone.

    Returns:
      The names removed.
    """
    removed = []
    if not os.path.isdir(export_base):
        return removed
    for name in os.listdir(export_base):
        m = _SCRATCH_RE.fullmatch(name)
        if m is None:
            continue
        if not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(export_base, name), ignore_errors=True)
            removed.append(name)
    return removed


def keras_file_problem(path: str) -> str | None:
    """Why a `.keras` file cannot be a complete Keras archive, or None when it looks whole.

    Keras reports a truncated or corrupt `.keras` file as "File not found"; this reads
    the zip directory and checks each member's CRC, so the message can say what is wrong.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = z.namelist()
    except (zipfile.BadZipFile, EOFError) as e:
        return f"unreadable or truncated: not a complete .keras (zip) archive ({e})"
    except OSError as e:
        return f"cannot be read: {e}"
    except (zipfile.LargeZipFile, ValueError, RuntimeError) as e:  # corrupt headers
        return f"unreadable or corrupt .keras (zip) archive ({type(e).__name__}: {e})"
    if bad is not None:
        return f"corrupt: member {bad!r} fails its CRC check (truncated or damaged file)"
    if "config.json" not in names:
        return f"not a Keras archive: no config.json among {sorted(names)[:5]}"
    return None


def load_keras_file(path: str, run_dir: str | None = None):
    """`keras.saving.load_model(path, compile=False)` with errors that name the file.

    The custom layers a model may hold register themselves on import: the shared
    backbones and heads always, and the builder of the family named in the
    `model_config.json` beside the file (when there is one), so callers need not import
    them first.

    Raises:
      ExportError: a missing, truncated or corrupt file (naming it, and the run to
        re-finish), or a model Keras cannot deserialise.
    """
    import keras

    run_dir = run_dir or os.path.dirname(path) or "."
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not found; has the training run in {run_dir} "
                          "reached its last step (bin/train writes model.keras then)?")
    problem = keras_file_problem(path)
    if problem is not None:
        raise ExportError(f"{path}: {problem}; re-finish the training run {run_dir} "
                          f"(bin/train --flagfile={os.path.join(run_dir, FLAGFILE_NAME)} "
                          "rewrites model.keras from its last checkpoint)")
    import ish_tf.models.backbones  # noqa: F401 - registers the custom layers
    import ish_tf.models.heads  # noqa: F401
    _import_family_builder(os.path.join(os.path.dirname(path) or ".", "model_config.json"))
    try:
        return keras.saving.load_model(path, compile=False)
    except Exception as e:  # Keras raises TypeError/ValueError for unknown layers etc.
        raise ExportError(f"{path}: cannot load the Keras model "
                          f"({type(e).__name__}: {e})") from e


def _stored_class_names(family: str, model_config: dict | None) -> list[str] | None:
    """The names of a classifier's `probabilities` columns as its run stored them.

    The classifier families persist them in model_config.json (`classes`: cell types,
    siRNAs, genes; `terms`: the GO terms of cdae_supervised). None for families without a
    `probabilities` output or a config without names.
    """
    from ish_tf.families import family_names, get_family

    if family not in family_names() or "probabilities" not in get_family(family).outputs:
        return None
    config = ((model_config or {}).get("config") or {}).get("family") or {}
    names = config.get("classes") or config.get("terms")
    return [str(n) for n in names] if names else None


def _import_family_builder(config_path: str) -> None:
    """Imports the builder of the family `config_path` names (its custom layers)."""
    if not os.path.isfile(config_path):
        return
    try:
        with open(config_path, encoding="utf-8") as f:
            family = json.load(f).get("builder")
    except (OSError, ValueError, AttributeError):
        return  # a broken config is reported where it is read for its content
    from ish_tf.families import family_names, get_family

    if family in family_names():
        get_family(family).import_builder()


# --------------------------------------------------------------------------- metadata
def parse_flagfile(text: str) -> dict[str, Any]:
    """Flag values of a flagfile (`--name=value`, `--flag`, `--noflag`; `#` comments).

    Returns:
      name -> value string, or True/False for bare boolean flags.
    """
    out: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("--"):
            continue
        name, sep, value = line[2:].partition("=")
        if sep:
            out[name] = value
        elif name.startswith("no") and len(name) > 2:
            out[name[2:]] = False
        else:
            out[name] = True
    return out


def read_metadata(saved_model_dir: str) -> dict:
    """Reads the sidecar `assets.extra/ish_tf.json` of a version directory.

    Raises:
      ExportError: no sidecar (not exported by ish_tf) or unreadable JSON.
    """
    path = fs.join(saved_model_dir, SIDECAR_DIR, SIDECAR_NAME)
    try:
        with fs.open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ExportError(f"{path}: missing; {saved_model_dir} was not exported by ish_tf") from e
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read the export metadata: {e}") from e



def open_trusted(path: str, allow_foreign: bool = False) -> tuple[str, dict]:
    """Resolves `path` to a version directory and reads its ish_tf metadata.

    The guard of every stage that loads a SavedModel (`bin/embed`, `bin/embed
    --expression`): a SavedModel is code, so one without ish_tf's sidecar is refused
    unless the user vouches for it (`allow_foreign`; its metadata is then `{}`).

    Returns:
      (version directory, metadata).

    Raises:
      ExportError: no SavedModel at `path`, or a foreign one without `allow_foreign`.
    """
    resolved = resolve_saved_model(path)
    try:
        return resolved, read_metadata(resolved)
    except ExportError as e:
        if not allow_foreign:
            raise ExportError(
                f"{resolved}: refusing to load a SavedModel without ish_tf's export "
                f"metadata ({e}). A SavedModel is code: loading and calling it runs its "
                "graph, which can read and write files; only load SavedModels from "
                "trusted sources. Re-export it with bin/export, or pass "
                "--allow_foreign_saved_model if you trust it") from None
        return resolved, {}  # exported by other tools, trusted by the user

# --------------------------------------------------------------------------- graph pieces
def decode_images(image_bytes, size: tuple[int, int], channels: int = 3,
                  max_scale: float | None = None):
    """Decodes a batch of JPEG/PNG strings to float32 images of one size.

    Each image is decoded with `tf.io.decode_image(channels=C)` (grayscale is
    expanded, alpha dropped) and, only when its size differs from `size`, resized
    bilinearly with antialiasing. Pixels stay in [0, 255].

    Args:
      image_bytes: tf.string (B,) encoded images.
      size: (H, W) of the output.
      channels: C.
      max_scale: reject images more than this factor from `size` (`fit_image`).

    Returns:
      float32 (B, H, W, C).
    """
    import tensorflow as tf

    height, width = int(size[0]), int(size[1])

    def one(data):
        image = tf.io.decode_image(data, channels=channels, expand_animations=False)
        return fit_image(tf.cast(image, tf.float32), height, width, channels, max_scale)

    return tf.map_fn(one, image_bytes,
                     fn_output_signature=tf.TensorSpec([height, width, channels], tf.float32))


def _name_outputs(result, names: Sequence[str], output_map: Mapping[str, Any] | None):
    """Maps the model's raw output(s) to {name: float32 tensor}."""
    import tensorflow as tf

    if output_map:
        picked = {}
        for name, key in output_map.items():
            picked[name] = result[key] if isinstance(result, (Mapping, list, tuple)) else result
        return {k: tf.cast(v, tf.float32) for k, v in picked.items()}
    if isinstance(result, Mapping):
        result = [result[k] for k in result]
    if not isinstance(result, (list, tuple)):
        result = [result]
    return {name: tf.cast(t, tf.float32) for name, t in zip(names, result, strict=True)}


def _model_output_count(model) -> int:
    outputs = getattr(model, "outputs", None)
    return len(outputs) if outputs else 1


# --------------------------------------------------------------------------- export
def _family_input_spec(family: str) -> InputSpec | None:
    """The registered family's `InputSpec`, or None for an unregistered family."""
    from ish_tf.families import family_names, get_family

    return get_family(family).inputs if family in family_names() else None


def export_saved_model(model, export_base: str, *, family: str = "triplet",
                       outputs: Sequence[str] | Mapping[str, Any] | None = None,
                       input_spec: InputSpec | None = None,
                       metadata: Mapping[str, Any] | None = None,
                       class_names: Sequence[str] | None = None,
                       flagfile: str | None = None, version: int | None = None,
                       keep: int = 5, overwrite: bool = False, search_index=None,
                       serving_resize: str = "near", input_transform=None) -> str:
    """Exports a Keras model as a new integer version of a TF Serving model.

    The signatures follow the input kind (see the module docstring): JPEG/PNG bytes,
    raw pixels or vectors for `serving_default`, the decoded-input signature, and
    `tf_example` (serialized records) for every kind.

    Args:
      model: keras.Model with one input: float32 images (B, H, W, C) (in [0, 255] for
        uint8 images; the stored values for uint16) or float32 vectors (B, D); in
        inference mode (it is called with `training=False`).
      export_base: `EXPORT/<name>`; created if missing.
      family: model family (`ish_tf.families`); sets the output names when `outputs`
        is None.
      outputs: output names in the model's output order, or {name: index or key} to
        pick from a list/dict-output model.
      input_spec: what the export serves (`InputSpec`; open sizes are taken from the
        model); None: derived from the model input (rank 4 -> images of its channel
        count, rank 2 -> vectors), with the stored dtype of the family's registered
        spec when it has the same kind and channels (else uint8).
      metadata: extra JSON-serialisable facts stored in the sidecar under "extra".
      class_names: class names (classifier families), stored in the sidecar; as many as
        the `probabilities` output has columns.
      flagfile: a flagfile (e.g. RUN/flags.cfg) copied to `assets.extra/flags.cfg`
        and parsed into the sidecar's "flags"; None or a missing file: no flags.
      version: the version number; None = newest + 1 (1 for the first).
      keep: keep only this many newest versions after exporting (0 = all); the new
        version itself is always kept.
      overwrite: replace `version` if it exists (else an existing version raises).
      search_index: an `ish_tf.export.search.SearchIndex`: adds the `search` and
        `search_embedding` signatures (exact top-k over its vectors; see that module).
      serving_resize: "near": `serving_default` resizes JPEG/PNG images within
        `MAX_SERVING_SCALE` of the input size and rejects the others; "any": resizes
        every image (see the module docstring).
      input_transform: raw input -> model input, in the graph (a family's
        `export_transform`, e.g. `ish_tf.families.fluorescence.export.SiteNormalisation`):
        an object with `record_keys` (record features it reads), `extra_inputs()`
        (TensorSpecs `serving_default` takes after the pixels), `apply(images, *extra)`,
        `from_records(images, parsed features)` and `describe()` (stored in the sidecar
        as "input_transform"). `tf_example` and a raw-pixel `serving_default` then apply
        it; the decoded-input signature keeps taking the model's own input. Raw-pixel
        image exports only.

    Returns:
      The version directory, `export_base/<version>`.

    Raises:
      ExportError: unknown family, output names that do not fit the model, class names
        that do not fit the `probabilities` output, a model
        input that is neither (H, W, C) nor (D,) with static sizes, an input spec that
        disagrees with the model, or an existing explicit version.
    """
    import keras
    import tensorflow as tf

    output_map = dict(outputs) if isinstance(outputs, Mapping) else None
    names, pixels_signature = family_outputs(family, tuple(output_map) if output_map else outputs)
    if not output_map and len(names) != _model_output_count(model):
        raise ExportError(f"model {model.name!r} has {_model_output_count(model)} output(s) but "
                          f"family {family!r} names {len(names)}: {names}")
    model_outputs = getattr(model, "outputs", None)
    if class_names is not None and not output_map and "probabilities" in names and model_outputs:
        width = model_outputs[names.index("probabilities")].shape[-1]
        if width is not None and int(width) != len(class_names):
            raise ExportError(f"model {model.name!r}: {int(width)} class probabilities but "
                              f"{len(class_names)} class names")
    if version is not None and version < 0:
        raise ExportError(f"version must be a non-negative integer, got {version}")
    if serving_resize not in SERVING_RESIZE:
        raise ExportError(f"serving_resize must be one of {', '.join(SERVING_RESIZE)}, got "
                          f"{serving_resize!r}")
    max_scale = MAX_SERVING_SCALE if serving_resize == "near" else None
    family_spec = _family_input_spec(family)
    try:
        spec = resolve_input_spec(model, input_spec, family_spec)
    except InputSpecError as e:
        raise ExportError(str(e)) from e
    if spec.kind == "vector":
        decoded_input = tf.TensorSpec([None, spec.dim], tf.float32, name=VECTORS_INPUT)
        if family_spec is None or family_spec.kind != "vector":
            pixels_signature = "predict_vectors"  # an image family's name would mislead
    else:
        decoded_input = tf.TensorSpec([None, spec.height, spec.width, spec.channels],
                                      tf.float32, name=PIXELS_INPUT)

    def serve_bytes(image_bytes):
        images = decode_images(image_bytes, (spec.height, spec.width), spec.channels,
                               max_scale)
        return _name_outputs(model(images, training=False), names, output_map)

    def serve_decoded(inputs):
        return _name_outputs(model(inputs, training=False), names, output_map)

    def serve_examples(examples):
        inputs = decode_records(examples, spec)
        if input_transform is not None:
            from ish_tf.data import records

            feats = tf.io.parse_example(
                examples, records.feature_spec(list(input_transform.record_keys), spec.kind))
            inputs = input_transform.from_records(inputs, feats)
        return _name_outputs(model(inputs, training=False), names, output_map)

    def serve_raw(inputs, *extra):
        return _name_outputs(model(input_transform.apply(inputs, *extra), training=False),
                             names, output_map)

    archive = keras.export.ExportArchive()
    archive.track(model)
    # The first endpoint is also TF Serving's default; name it so explicitly.
    if input_transform is not None and (spec.kind != "image" or takes_image_bytes(spec)):
        raise ExportError(f"an input transform needs a raw-pixel image export, not "
                          f"{spec.describe()}")
    if input_transform is not None:
        archive.add_endpoint(SERVING_DEFAULT, serve_raw,
                             input_signature=[decoded_input, *input_transform.extra_inputs()])
    elif takes_image_bytes(spec):
        archive.add_endpoint(SERVING_DEFAULT, serve_bytes,
                             input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    else:
        archive.add_endpoint(SERVING_DEFAULT, serve_decoded, input_signature=[decoded_input])
    archive.add_endpoint(pixels_signature, serve_decoded, input_signature=[decoded_input])
    archive.add_endpoint(TF_EXAMPLE, serve_examples,
                         input_signature=[tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)])
    search_meta = None
    if search_index is not None and input_transform is not None:
        raise ExportError("a search index on an export with an input transform is not "
                          "supported: the search signatures would skip the transform")
    if search_index is not None:
        from ish_tf.export import search

        search_meta = search.add_search_endpoints_for(archive, search_index, model, spec, names,
                                                      output_map)

    try:
        os.makedirs(export_base, exist_ok=True)
        remove_stale_exports(export_base)
        tmp = tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=_TMP_SUFFIX,
                               dir=export_base)
    except OSError as e:
        raise _write_error(export_base, e) from e
    try:
        # write_out wants to create the directory itself.
        os.rmdir(tmp)
        with _quiet_tensorflow_logs():
            archive.write_out(tmp, verbose=False)
        flags_text = _read_text(flagfile)
        sidecar = _sidecar(model, family, pixels_signature, names, spec, serving_resize,
                           class_names,
                           flags_text, metadata)
        if input_transform is not None:
            sidecar["input_transform"] = input_transform.describe()
            sidecar["signatures"][SERVING_DEFAULT]["inputs"] = {
                PIXELS_INPUT: sidecar["signatures"][SERVING_DEFAULT]["inputs"][PIXELS_INPUT],
                **{t.name: f"{t.dtype.name} (B,)" for t in input_transform.extra_inputs()}}
            sidecar["signatures"][pixels_signature]["inputs"] = {
                PIXELS_INPUT: "float32 (B, H, W, C): the model's input (already transformed: "
                              f"{input_transform.describe().get('decoded_signature_takes', '')})"}
            sidecar["preprocessing"] += f"; then {input_transform.describe()['kind']}"
        if search_meta is not None:
            sidecar["signatures"].update(search_meta.pop("signatures"))
            sidecar["search"] = search_meta
        _write_sidecar(tmp, sidecar, flags_text)
        final = _commit(tmp, export_base, version, overwrite)
    except (OSError, tf.errors.OpError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(export_base, e) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        prune_versions(export_base, keep, protect=int(os.path.basename(final)))
    except OSError as e:
        raise ExportError(f"{final} was written, but pruning old versions of {export_base} "
                          f"failed: {_os_message(e)}") from e
    return final


def _os_message(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''}"
    return str(getattr(e, "message", None) or e).strip().splitlines()[0]


def _write_error(export_base: str, e: BaseException) -> ExportError:
    """An I/O failure while writing an export, as one line naming the path."""
    return ExportError(f"cannot write the export to {export_base} ({_os_message(e)}); "
                       "nothing was added: free space or make it writable and rerun")


@contextlib.contextmanager
def _quiet_tensorflow_logs():
    """Mutes the SavedModel writer's INFO lines (assets, fingerprint, renamed inputs).

    TensorFlow logs them both through the "tensorflow" logger and through absl.
    """
    import logging

    from absl import logging as absl_logging

    logger = logging.getLogger("tensorflow")
    level, verbosity = logger.level, absl_logging.get_verbosity()
    logger.setLevel(max(level, logging.WARNING))
    absl_logging.set_verbosity(min(verbosity, absl_logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
        absl_logging.set_verbosity(verbosity)


def _read_text(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def _signature_inputs(spec: InputSpec, pixels: str,
                      serving_resize: str = "near") -> dict[str, dict[str, str]]:
    """Signature name -> {input name: description}, as exported for `spec`."""
    if spec.kind == "vector":
        decoded = {VECTORS_INPUT: f"float32 (B, {spec.dim})"}
    else:
        scale = "in [0, 255]" if spec.dtype == "uint8" else f"the stored {spec.dtype} values"
        decoded = {PIXELS_INPUT: f"float32 (B, {spec.height}, {spec.width}, {spec.channels}) "
                                 f"{scale}"}
    if serving_resize == "near":
        sizes = (f"of about {spec.height}x{spec.width} px (resized to it within "
                 f"{MAX_SERVING_SCALE:g}x; farther sizes are rejected)")
    else:
        sizes = f"of any size (resized to {spec.height}x{spec.width} px)"
    default = ({BYTES_INPUT: f"string (B,): JPEG or PNG bytes {sizes}"}
               if takes_image_bytes(spec) else decoded)
    return {SERVING_DEFAULT: default, pixels: decoded,
            TF_EXAMPLE: {EXAMPLES_INPUT: f"string (B,): serialized tf.train.Example records "
                                         f"(ish_tf.data.records, {spec.kind})"}}


def _preprocessing(spec: InputSpec, serving_resize: str = "near") -> str:
    if spec.kind == "vector":
        return "vector (float32, D values) -> model"
    resize = "bilinear antialiased resize to the input size when different"
    if takes_image_bytes(spec):
        limit = (f" (images more than {MAX_SERVING_SCALE:g}x from "
                 f"{spec.height}x{spec.width} rejected)" if serving_resize == "near" else "")
        return f"decode_image(channels=C) -> {resize}{limit} -> float32 [0, 255] -> model"
    return (f"raw pixels -> float32 (stored values, unscaled) -> model; tf_example: "
            f"decode_raw -> {resize}")


def _sidecar(model, family: str, pixels: str, names: Sequence[str], spec: InputSpec,
             serving_resize: str, class_names: Sequence[str] | None, flags_text: str | None,
             metadata: Mapping[str, Any] | None) -> dict:
    import keras
    import tensorflow as tf

    import ish_tf
    from ish_tf.data import records

    outputs = list(model.outputs) if getattr(model, "outputs", None) else []
    output_shapes = {}
    for name, tensor in zip(names, outputs, strict=False):
        output_shapes[name] = [None] + [int(d) if d is not None else None
                                        for d in tuple(tensor.shape)[1:]]
    if spec.kind == "image":
        # Version-1 keys, unchanged: readers print height x width x channels.
        model_input = {"height": spec.height, "width": spec.width, "channels": spec.channels,
                       "dtype": "float32",
                       "range": [0, 255] if spec.dtype == "uint8"
                       else [0, int(np.iinfo(spec.dtype).max)]}
    else:
        model_input = {"height": None, "width": None, "channels": None, "dim": spec.dim,
                       "dtype": "float32"}
    signatures = _signature_inputs(spec, pixels, serving_resize)
    default_input = next(iter(signatures[SERVING_DEFAULT]))
    return {
        "format_version": SIDECAR_FORMAT,
        "family": family,
        "model_name": model.name,
        "input": model_input,
        "input_size": spec.height if spec.kind == "image" else None,
        "input_kind": spec.kind,
        "input_spec": spec.to_dict(),
        "outputs": list(names),
        "output_shapes": output_shapes,
        "signatures": {name: {"inputs": inputs, "outputs": list(names)}
                       for name, inputs in signatures.items()},
        "signature_names": {"serving_default": SERVING_DEFAULT,
                            "serving_default_input": default_input,
                            "decoded": pixels, "records": TF_EXAMPLE},
        "preprocessing": _preprocessing(spec, serving_resize),
        "serving_resize": serving_resize if spec.kind == "image" else None,
        "class_names": list(class_names) if class_names is not None else None,
        "flags": parse_flagfile(flags_text) if flags_text else {},
        "schema": {"record_features": list(records.FEATURE_KEYS)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"ish_tf": ish_tf.__version__, "tensorflow": tf.__version__,
                     "keras": keras.__version__},
        "extra": dict(metadata or {}),
    }


def _write_sidecar(saved_model_dir: str, sidecar: dict, flags_text: str | None) -> None:
    extra = os.path.join(saved_model_dir, SIDECAR_DIR)
    os.makedirs(extra, exist_ok=True)
    atomic_write_text(os.path.join(extra, SIDECAR_NAME),
                      json.dumps(sidecar, indent=1, sort_keys=True, default=str) + "\n")
    if flags_text is not None:
        atomic_write_text(os.path.join(extra, FLAGFILE_NAME), flags_text)


def _commit(tmp: str, export_base: str, version: int | None, overwrite: bool) -> str:
    """Renames the finished temporary directory to its version number."""
    if version is not None:
        final = os.path.join(export_base, str(version))
        if os.path.exists(final):
            if not is_ish_tf_export(final):
                raise ExportError(f"{final} exists and is not an ish_tf SavedModel (no "
                                  f"saved_model.pb with {SIDECAR_DIR}/{SIDECAR_NAME}); it is "
                                  "left alone: move it away or choose another --version")
            if not overwrite:
                raise ExportError(f"{final} already exists; choose another version, omit it "
                                  "(next = newest + 1) or pass overwrite")
            trash = os.path.join(export_base, f"{_TRASH_PREFIX}{os.getpid()}-{version}")
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final)
        return final
    # newest + 1; a concurrent exporter may take the number first (rename onto a
    # non-empty directory fails), then try the next one.
    for _ in range(100):
        final = os.path.join(export_base, str((latest_version(export_base) or 0) + 1))
        try:
            if not os.path.exists(final):
                os.rename(tmp, final)
                return final
        except OSError:
            if not os.path.exists(final):
                raise  # not a lost race: a real error (permissions, disk)
    raise ExportError(f"{export_base}: could not claim a new version number")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Settings of `bin/export` (see `export_run`).

    Attributes:
      model_dir: the training run RUN (holding model.keras) or a `.keras` file.
      export_dir: the export base `EXPORT/<name>`.
      family: model family; "" = from RUN/model_config.json, else "triplet".
      version: version number; None = newest + 1.
      keep: newest versions kept (0 = all).
      overwrite: replace an existing explicit version.
      serving_resize: "near" or "any" (see `export_saved_model`).
    """

    model_dir: str
    export_dir: str
    family: str = ""
    version: int | None = None
    keep: int = 5
    overwrite: bool = False
    serving_resize: str = "near"

    def validate(self) -> ExportConfig:
        """Checks the settings; returns self.

        Raises:
          ExportError: naming the offending flag.
        """
        if not self.model_dir:
            raise ExportError("--model_dir is required: the training run directory RUN "
                              "(with model.keras) or a .keras file")
        if not self.export_dir:
            raise ExportError("--export_dir is required: the export base EXPORT/<name>")
        if self.version is not None and self.version < 0:
            raise ExportError(f"--version must be >= 0, got {self.version}")
        if self.keep < 0:
            raise ExportError(f"--keep must be >= 0 (0 keeps all), got {self.keep}")
        return self


def export_run(model_dir: str, export_base: str, *, family: str | None = None,
               version: int | None = None, keep: int = 5, overwrite: bool = False,
               class_names: Sequence[str] | None = None,
               input_spec: InputSpec | None = None, search_index: str | None = None,
               search_metric: str = "", serving_resize: str = "near") -> str:
    """Exports a training run's `RUN/model.keras` (see `export_saved_model`).

    The family is read from `RUN/model_config.json` ("builder") unless given;
    `RUN/flags.cfg` goes into the sidecar, `model_config.json` under "extra".

    Args:
      model_dir: the run directory RUN (or a `.keras` file).
      export_base: `EXPORT/<name>`.
      family: model family; default from model_config.json, else "triplet".
      version, keep, overwrite, class_names, input_spec, serving_resize: as in
        `export_saved_model`
        (the input kind and signatures follow the model input and the family's spec).
      search_index: an embedding table (e.g. bin/embed's gene_embeddings.csv) to search:
        adds the `search` signatures (`ish_tf.export.search`).
      search_metric: its distance; "" = the training metric in model_config.json.

    Returns:
      The version directory.

    Raises:
      ExportError: no model.keras, a truncated or corrupt one (naming it and the run to
        re-finish), or a model that cannot be loaded or exported.
    """

    if model_dir.endswith(".keras"):
        model_path, run_dir = model_dir, os.path.dirname(model_dir)
    else:
        model_path, run_dir = os.path.join(model_dir, "model.keras"), model_dir
    if not os.path.isfile(model_path):
        load_keras_file(model_path, run_dir)  # raises, naming the file and the run
    extra: dict[str, Any] = {"source_model": os.path.abspath(model_path)}
    config_path = os.path.join(run_dir, "model_config.json")
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                extra["model_config"] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"{config_path}: cannot read: {e}") from e
    if family is None:
        family = str(extra.get("model_config", {}).get("builder") or "triplet")
    # load_keras_file imports the builder named beside the file (its custom layers); a
    # family given explicitly is imported here too (its export outputs).
    from ish_tf.families import family_names, get_family

    if family in family_names():
        get_family(family).import_builder()
    model = load_keras_file(model_path, run_dir)
    if class_names is None:
        class_names = _stored_class_names(family, extra.get("model_config"))
    transform = None
    if family in family_names() and get_family(family).export_transform:
        from ish_tf.families import resolve_ref

        try:
            transform = resolve_ref(get_family(family).export_transform)(
                run_dir, extra.get("model_config"))
        except ValueError as e:
            raise ExportError(str(e)) from e
    index = None
    if search_index:
        from ish_tf.export import search

        index = search.load_index_for_export(search_index, search_metric,
                                             extra.get("model_config"))
    return export_saved_model(model, export_base, family=family, metadata=extra,
                              search_index=index, input_transform=transform,
                              class_names=class_names, input_spec=input_spec,
                              flagfile=os.path.join(run_dir, FLAGFILE_NAME),
                              version=version, keep=keep, overwrite=overwrite,
                              serving_resize=serving_resize)

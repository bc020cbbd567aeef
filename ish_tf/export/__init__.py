"""Export trained models as versioned TF Serving SavedModels (`bin/export`).

See `ish_tf.export.saved_model` for the layout, the signatures and the sidecar.
Importing this package does not import TensorFlow.
"""

from ish_tf.export.saved_model import (
    BYTES_INPUT,
    FAMILIES,
    PIXELS_INPUT,
    SERVING_DEFAULT,
    ExportConfig,
    ExportError,
    FamilySpec,
    decode_images,
    export_run,
    export_saved_model,
    latest_version,
    list_versions,
    parse_flagfile,
    prune_versions,
    read_metadata,
    register_family,
    remove_stale_exports,
    resolve_saved_model,
)

__all__ = [
    "BYTES_INPUT", "FAMILIES", "PIXELS_INPUT", "SERVING_DEFAULT", "ExportConfig", "ExportError",
    "FamilySpec",
    "decode_images", "export_run", "export_saved_model", "latest_version", "list_versions",
    "parse_flagfile", "prune_versions", "read_metadata", "register_family",
    "remove_stale_exports", "resolve_saved_model",
]

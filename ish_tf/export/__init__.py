"""Export trained models as versioned TF Serving SavedModels (`bin/export`).

See `ish_tf.export.saved_model` for the layout, the signatures and the sidecar.
Importing this package does not import TensorFlow.
"""

from ish_tf.export.saved_model import (
    SERVING_DEFAULT,
    ExportConfig,
    ExportError,
    decode_images,
    export_run,
    export_saved_model,
    exported_versions,
    family_outputs,
    is_ish_tf_export,
    latest_version,
    list_versions,
    parse_flagfile,
    prune_versions,
    read_metadata,
    remove_stale_exports,
    resolve_saved_model,
)
from ish_tf.export.signatures import (
    BYTES_INPUT,
    EXAMPLES_INPUT,
    PIXELS_INPUT,
    TF_EXAMPLE,
    VECTORS_INPUT,
    decode_records,
    resolve_input_spec,
)

__all__ = [
    "BYTES_INPUT", "EXAMPLES_INPUT", "PIXELS_INPUT", "SERVING_DEFAULT", "TF_EXAMPLE",
    "VECTORS_INPUT", "ExportConfig", "ExportError", "decode_images", "decode_records",
    "resolve_input_spec", "export_run", "export_saved_model", "exported_versions", "family_outputs",
    "is_ish_tf_export", "latest_version", "list_versions",
    "parse_flagfile", "prune_versions", "read_metadata",
    "remove_stale_exports", "resolve_saved_model",
]

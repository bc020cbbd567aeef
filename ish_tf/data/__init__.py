"""Data layer: manifests, image sources, masks, patches, TFRecords and tf.data readers."""

"""Shared model parts: backbones, heads, custom layers, batch-norm tools.

Whole models are built by the families (`ish_tf.families`, one package each); every
image model takes pixels in [0, 255] and carries its own preprocessing, so a saved
`model.keras` can be served on raw pixels. Importing this package is cheap.
"""

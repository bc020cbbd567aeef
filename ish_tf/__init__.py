"""ish_tf: learn and measure compact representations of gene-expression (ISH) images.

Stages talk through files: fetch -> extract -> train -> export -> embed -> evaluate.
Each stage is a `bin/` command backed by a library module; see README.md.
"""

__version__ = "0.1.0"

"""What a model family takes as input, and what a record set holds: an `InputSpec`.

Two kinds flow through records, training, export and embedding:

- ``image``: (H, W, C) pixels, C = 3 for RGB sections (stored as JPEG/PNG), any other
  channel count (6-channel fluorescence plates) stored losslessly;
- ``vector``: a float vector of dimension D (a gene-expression profile).

The spec is plain data (no TensorFlow), so the family registry, `index.json` and the
export sidecar can all carry it as JSON.
"""

from __future__ import annotations

import dataclasses
from typing import Any

INPUT_KINDS: tuple[str, ...] = ("image", "vector")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The input of a model family, or the content of a record set.

    Attributes:
      kind: "image" or "vector".
      channels: image channels C (3 = RGB).
      height: image height in pixels (None: not fixed by the family; the config's size).
      width: image width in pixels (None: as height).
      dim: vector dimension D (0: not fixed by the family; set by the data).
      dtype: numpy name of the stored values ("uint8" or "uint16" for images,
        "float32" for vectors).
    """

    kind: str = "image"
    channels: int = 3
    height: int | None = None
    width: int | None = None
    dim: int = 0
    dtype: str = "uint8"

    def __post_init__(self):
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input kind must be one of {INPUT_KINDS}, got {self.kind!r}")
        if self.kind == "image" and self.channels < 1:
            raise ValueError(f"an image input needs channels >= 1, got {self.channels}")
        if self.kind == "vector" and self.dim < 0:
            raise ValueError(f"a vector input needs dim >= 0, got {self.dim}")

    @classmethod
    def image(cls, channels: int = 3, height: int | None = None, width: int | None = None,
              dtype: str = "uint8") -> InputSpec:
        """An image input (width defaults to height)."""
        return cls(kind="image", channels=channels, height=height,
                   width=width if width is not None else height, dtype=dtype)

    @classmethod
    def vector(cls, dim: int = 0) -> InputSpec:
        """A float vector input of dimension `dim` (0: set by the data)."""
        return cls(kind="vector", channels=0, dim=dim, dtype="float32")

    @property
    def shape(self) -> tuple[int | None, ...]:
        """Shape of one example: (H, W, C) or (D,) (None where not fixed)."""
        if self.kind == "image":
            return (self.height, self.width, self.channels)
        return (self.dim or None,)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for index.json and the export sidecar)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        """Inverse of `to_dict`; unknown keys raise so a newer file is noticed.

        Raises:
          ValueError: unknown keys or an invalid spec.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"input spec has unknown keys {sorted(unknown)}")
        return cls(**data)

    def describe(self) -> str:
        """A short human description ("image 256x256x3 uint8", "vector 765 float32")."""
        if self.kind == "image":
            h = self.height if self.height is not None else "R"
            w = self.width if self.width is not None else h
            return f"image {h}x{w}x{self.channels} {self.dtype}"
        return f"vector {self.dim or 'D'} {self.dtype}"

"""Writing a complete record set from in-memory examples of any input kind.

`write_record_set` is what tests, ingesters (expression matrices, fluorescence
plates) and small tools use instead of `bin/extract`: it writes shards, offsets,
`index.json` and `genes.csv` through `ish_tf.data.shards`, with records built by
`ish_tf.data.records.make_example` and checked against the set's `InputSpec`, so
every reader (`ish_tf.data.pipeline`, `ish_tf.embed`) reads the result as it reads an
extracted set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ish_tf.data import records, shards
from ish_tf.data.inputs import InputSpec
from ish_tf.data.records import RecordsError

# Example keys naming the roles; the schema keys (gene_symbol, donor_id) work too.
_IDENTITY = "identity"
_GROUP = "group"


def _normalise(example: Mapping[str, Any], position: int) -> dict[str, Any]:
    ex = dict(example)
    for role, key in ((_IDENTITY, records.IDENTITY_KEY), (_GROUP, records.GROUP_KEY)):
        if role in ex and key in ex:
            raise RecordsError(f"example {position}: give '{role}' or '{key}', not both")
        if role in ex:
            ex[key] = ex.pop(role)
    if records.IDENTITY_KEY not in ex:
        raise RecordsError(f"example {position}: no identity (key '{_IDENTITY}' or "
                           f"'{records.IDENTITY_KEY}')")
    for key in (records.IDENTITY_INDEX_KEY, records.GROUP_INDEX_KEY):
        if key in ex:
            raise RecordsError(f"example {position}: '{key}' is assigned by write_record_set "
                               "from the sorted vocabulary; leave it out")
    ex[records.IDENTITY_KEY] = str(ex[records.IDENTITY_KEY])
    ex[records.GROUP_KEY] = str(ex.get(records.GROUP_KEY, ""))
    return ex


def _complete_spec(spec: InputSpec, first: Mapping[str, Any]) -> InputSpec:
    """Fills what the spec leaves open (vector dim, image size) from the first example."""
    if spec.kind == "vector" and not spec.dim:
        if "vector" not in first:
            raise RecordsError("example 0 of a vector set has no 'vector'")
        return InputSpec.vector(int(np.asarray(first["vector"]).size))
    if spec.kind == "image" and spec.height is None:
        image = next((first[k] for k in ("image", "image_encoded", "image/encoded", "encoded")
                      if k in first), None)
        if isinstance(image, np.ndarray):
            return dataclasses.replace(spec, height=int(image.shape[0]),
                                       width=int(image.shape[1]))
        height = next((first[k] for k in ("image_height", "image/height", "height")
                       if k in first), None)
        width = next((first[k] for k in ("image_width", "image/width", "width")
                      if k in first), height)
        if height is not None:
            return dataclasses.replace(spec, height=int(height), width=int(width))
    return spec


def write_record_set(out_dir: str, split_examples: Mapping[str, Iterable[Mapping[str, Any]]],
                     spec: InputSpec, *, num_shards: int = 1,
                     identity_name: str = records.DEFAULT_IDENTITY_NAME,
                     group_name: str = records.DEFAULT_GROUP_NAME,
                     compression: str | None = None, seed: int = 0,
                     extra: Mapping[str, Any] | None = None) -> shards.DatasetInfo:
    """Writes a complete record set (shards, offsets, index.json, genes.csv).

    Each example is a dict with:

    - ``identity`` (or ``gene_symbol``): the identity (a gene, a perturbation, ...);
    - ``group`` (or ``donor_id``), optional: the group (a donor, a plate, ...);
    - ``image_id``, optional (default: the example's position in the whole set);
    - for an image set, ``image``: a uint8/uint16 array (H, W[, C]) or encoded bytes
      (with ``image_height``/``image_width``, and for raw bytes ``image_format="raw"``,
      ``image_channels``, ``image_dtype``); for a vector set, ``vector``: D floats;
    - any other record feature (patch_index, x, y, source_size, entrez_id, region,
      study, label).

    Identity and group indices are assigned here: identities sorted over all splits
    (the gene vocabulary of the index), groups sorted (the donor list). Within a split,
    whole identities go to one of `min(num_shards, identities)` shards (as bin/extract
    does) and a shard holds each identity's records contiguously, ordered by
    (image_id, patch_index), so the P×K reader can find them.

    Args:
      out_dir: the new records directory (must hold no index yet).
      split_examples: split name ("train", "validation", "test") -> examples.
      spec: the set's input kind; an image size or vector dimension left open is
        taken from the first example. Every record is checked against it.
      num_shards: shards per split (at most one per identity).
      identity_name: what identities are ("gene", "perturbation", "cell_type", ...).
      group_name: what groups are ("donor", "plate", "batch", ...).
      compression: None or "GZIP" (the P×K reader needs None).
      seed: stored in the dataset info.
      extra: free-form facts stored in the dataset info.

    Returns:
      The `DatasetInfo` written to the index.

    Raises:
      RecordsError: an existing index in `out_dir`, an unknown split, no examples, or
        an example that breaks the schema or the spec (the message names the field).
    """
    if shards.load_index(out_dir, missing_ok=True)["shards"]:
        raise RecordsError(f"{out_dir}: already holds a record set; write to a fresh directory")
    unknown = sorted(set(split_examples) - set(shards.SPLITS))
    if unknown:
        raise RecordsError(f"unknown split(s) {unknown}; splits are {shards.SPLITS}")
    by_split: dict[str, list[dict[str, Any]]] = {}
    position = 0
    for split in shards.SPLITS:
        if split not in split_examples:
            continue
        rows = []
        for example in split_examples[split]:
            ex = _normalise(example, position)
            ex.setdefault("image_id", position)
            rows.append(ex)
            position += 1
        if rows:
            by_split[split] = rows
    if not by_split:
        raise RecordsError("write_record_set: no examples")
    spec = _complete_spec(spec, next(iter(by_split.values()))[0])

    identity_splits: dict[str, set[str]] = {}
    group_splits: dict[str, set[str]] = {}
    entrez: dict[str, int] = {}
    for split, rows in by_split.items():
        for ex in rows:
            identity_splits.setdefault(ex[records.IDENTITY_KEY], set()).add(split)
            group_splits.setdefault(ex[records.GROUP_KEY], set()).add(split)
            if "entrez_id" in ex:
                entrez[ex[records.IDENTITY_KEY]] = int(ex["entrez_id"])
    by_identity = all(len(s) == 1 for s in identity_splits.values())
    by_group = not by_identity and all(len(s) == 1 for s in group_splits.values())
    genes = shards.make_gene_vocabulary(
        identity_splits, {g: next(iter(s)) for g, s in identity_splits.items() if len(s) == 1},
        entrez)
    groups = sorted(g for g in group_splits if g)
    fmt = "vector" if spec.kind == "vector" else (
        records.RAW_FORMAT if records.stores_raw(spec.channels, spec.dtype) else "png")
    info = shards.DatasetInfo(
        genes=genes, donors=groups, source_size=spec.height or 0, patch_size=spec.height or 0,
        format=fmt, seed=seed, split_by="donor" if by_group else "gene",
        donor_splits={g: next(iter(s)) for g, s in group_splits.items() if g} if by_group else {},
        extra=dict(extra or {}), input_spec=spec.to_dict(), identity_name=identity_name,
        group_name=group_name)
    shards.write_dataset_info(out_dir, info)

    identity_index = info.gene_index()
    group_index = {g: i for i, g in enumerate(groups)}
    for split, rows in by_split.items():
        identities = sorted({ex[records.IDENTITY_KEY] for ex in rows})
        k = min(num_shards, len(identities))
        shard_of = shards.assign_shards(identities, k)
        rows = sorted(rows, key=lambda ex: (ex[records.IDENTITY_KEY], int(ex["image_id"]),
                                            int(ex.get("patch_index", 0))))
        for index in range(k):
            with shards.ShardWriter(out_dir, split, index, k, compression) as writer:
                for ex in rows:
                    identity = ex[records.IDENTITY_KEY]
                    if shard_of[identity] != index:
                        continue
                    fields = dict(ex)
                    fields[records.IDENTITY_INDEX_KEY] = identity_index[identity]
                    fields[records.GROUP_INDEX_KEY] = group_index.get(ex[records.GROUP_KEY], -1)
                    try:
                        serialized = records.make_example(input_spec=spec, **fields)
                    except RecordsError as e:
                        raise RecordsError(f"{split} example of {identity_name} "
                                           f"{identity!r}, image_id {ex['image_id']}: {e}") from e
                    writer.write(serialized, identity, int(ex["image_id"]))
            shards.update_index(out_dir, writer.info)
    shards.remove_index_lock(out_dir)
    return info


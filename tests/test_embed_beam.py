"""bin/embed --runner=beam: the local path's tables (CSV and Parquet), shard errors named."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("apache_beam")
tf = pytest.importorskip("tensorflow")

from ish_tf import embed, embed_beam  # noqa: E402
from ish_tf.data.embeddings import read_embedding_table  # noqa: E402
from tests.test_embed import dataset, exported, write_records  # noqa: E402,F401


def _cfg(exported, records_dir, out, **kw) -> embed.EmbedConfig:  # noqa: F811
    return embed.EmbedConfig(saved_model=exported[1], records_dir=records_dir, out_dir=str(out),
                             batch_size=3, **kw)


def test_beam_embedding_writes_the_local_tables(exported, dataset, tmp_path):  # noqa: F811
    records_dir, _ = dataset
    local = embed.embed_records(_cfg(exported, records_dir, tmp_path / "local",
                                     table_format="parquet"))
    beam = embed_beam.embed_records_beam(_cfg(exported, records_dir, tmp_path / "beam",
                                              table_format="parquet"))
    assert beam.tables.keys() == local.tables.keys() and beam.rows == local.rows
    assert beam.patches_embedded == local.patches_embedded == local.rows["patch"]
    assert beam.tables["gene"].endswith(".parquet")
    for level, path in local.tables.items():
        a, b = read_embedding_table(path), read_embedding_table(beam.tables[level])
        assert a.keys.equals(b.keys), level
        np.testing.assert_allclose(a.values, b.values, rtol=1e-6, atol=1e-6)
    assert not os.path.exists(tmp_path / "beam" / embed.PARTS_DIR)
    # A rerun of a finished run embeds nothing new.
    again = embed_beam.embed_records_beam(_cfg(exported, records_dir, tmp_path / "beam",
                                               table_format="parquet"))
    assert again.rows == local.rows


def test_beam_embedding_names_a_short_shard(exported, tmp_path):  # noqa: F811
    records_dir = str(tmp_path / "records")
    write_records(records_dir)
    path = os.path.join(records_dir, "test-00000-of-00001.tfrecord")
    data = open(path, "rb").read()
    with open(path, "wb") as f:  # cut the last record off
        f.write(data[:-(len(data) // 5)])
    with pytest.raises(embed.EmbedError, match="test-00000-of-00001.tfrecord"):
        embed_beam.embed_records_beam(_cfg(exported, records_dir, tmp_path / "out"))

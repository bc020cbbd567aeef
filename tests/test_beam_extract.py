"""bin/extract --runner=beam: the local runner's shards byte for byte, lost records caught,
interrupted runs redone cleanly. One small module-scoped dataset (Beam start-up is slow)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("apache_beam")

from ish_tf.data import beam_extract as B  # noqa: E402
from ish_tf.data import patches as P  # noqa: E402
from ish_tf.data import shards  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """6 genes x 2 donors x 1 image, 224x256 synthetic sections."""
    from ish_tf.data.synthetic import SynthConfig, generate_dataset

    out = tmp_path_factory.mktemp("synth_beam")
    generate_dataset(SynthConfig(out_dir=str(out), n_genes=6, n_donors=2, donors_per_gene=2,
                                 images_per_gene_donor=1, height=224, width=256, seed=2))
    return out


def _cfg(synth, out, **kw) -> P.ExtractConfig:
    base = dict(manifest=str(synth / "manifest.csv"), out_dir=str(out), patches_per_image=3,
                source_size=96, patch_size=24, min_fraction=0.8, max_tries=100, num_shards=2,
                seed=4, fast_decode=True)
    base.update(kw)
    return P.ExtractConfig(**base)


def _files(out) -> dict[str, bytes]:
    """Every output file but the lock and the run-specific paths inside index.json."""
    found = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith(".") or os.path.isdir(path):
            continue
        found[name] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def local(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    P.run_extract(_cfg(synth, out))
    return out


def test_pipeline_options_run_fnapi_and_refuse_multi_threading():
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    runner, options = B.pipeline_options("", workers=1)
    assert isinstance(runner, FnApiRunner)
    assert options.get_all_options()["direct_running_mode"] == "in_memory"
    _, options = B.pipeline_options("", workers=3)
    assert options.get_all_options()["direct_num_workers"] == 3
    assert options.get_all_options()["direct_running_mode"] == "multi_processing"
    assert B.pipeline_options("--runner=DataflowRunner --project=p")[0] == "DataflowRunner"
    with pytest.raises(P.ExtractError, match="multi_threading is refused"):
        B.pipeline_options("--direct_running_mode=multi_threading")


def test_lost_record_stops_the_run_naming_the_shard_and_a_rerun_equals_local(
        synth, local, tmp_path, monkeypatch):
    out = tmp_path / "beam"
    victim = "train-00001-of-00002.tfrecord"
    write = B._write_record

    def lossy(writer, serialized, gene, image_id):
        # Drops the second record of one shard, as the multi-threaded runner was seen to.
        if os.path.basename(writer.path) == victim and writer._n == 1 and not lossy.dropped:
            lossy.dropped = True
            return
        write(writer, serialized, gene, image_id)

    lossy.dropped = False
    monkeypatch.setattr(B, "_write_record", lossy)
    with pytest.raises(B.ShardCountError, match=f"{victim}: the plan's images produced"):
        B.run_extract_beam(_cfg(synth, out))
    assert victim not in os.listdir(out)  # never moved into place
    assert victim not in {s["file"] for s in shards.load_index(str(out), True)["shards"]}
    monkeypatch.setattr(B, "_write_record", write)
    # A killed run's leftovers: a staged shard and a partial temporary file.
    stale = out / B.STAGING / "train-00000" / "x"
    stale.mkdir(parents=True)
    (stale / "train-00000-of-00002.tfrecord").write_bytes(b"partial")
    (out / ".test-00000-of-00001.tfrecord.abc.tmp").write_bytes(b"partial")

    summary = B.run_extract_beam(_cfg(synth, out))
    assert summary["shards_written"] == len(shards.load_index(str(out))["shards"])
    assert not (out / B.STAGING).exists() and not (out / B.RESULTS).exists()
    got, want = _files(out), _files(local)
    assert set(got) == set(want) and "extract_report.csv" in got and "genes.csv" in got
    for name in want:
        if name == "index.json":
            a, b = json.loads(got[name]), json.loads(want[name])
            assert a["shards"] == b["shards"]
            continue
        assert got[name] == want[name], name  # shards, offsets, report, genes: same bytes
    # A rerun keeps every shard.
    again = B.run_extract_beam(_cfg(synth, out))
    assert again["shards_written"] == 0 and again["shards_resumed"] == summary["shards_written"]


def test_cli_runner_beam_writes_the_local_shards(synth, local, tmp_path, capsys):
    from absl import app

    from ish_tf import cli
    from ish_tf.cli import extract

    out = tmp_path / "cli"
    argv = [f"--manifest={synth / 'manifest.csv'}", f"--out={out}", "--patches_per_image=3",
            "--source_size=96", "--patch_size=24", "--min_fraction=0.8", "--max_tries=100",
            "--num_shards=2", "--seed=4", "--fast_decode", "--runner=beam"]
    assert extract.main(cli.parse("extract", argv), []) == 0
    n = len(shards.load_index(str(local))["shards"])
    assert f"wrote {n} shard(s)" in capsys.readouterr().out
    got, want = _files(out), _files(local)
    for name in want:
        if name.endswith((".tfrecord", ".npy", ".csv")):
            assert got[name] == want[name], name
    with pytest.raises(app.UsageError, match="--whole_images runs locally"):
        extract.main(cli.parse("extract", [*argv, "--whole_images"]), [])

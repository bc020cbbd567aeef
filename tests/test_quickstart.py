"""The quickstart orchestration end to end, at a tiny size (the real run is bin/quickstart)."""

import json
import os

import pytest

from ish_tf.data.patches import ExtractConfig
from ish_tf.data.synthetic import SynthConfig
from ish_tf.families import ModelConfig
from ish_tf.families.triplet.config import TripletConfig
from ish_tf.families.triplet.quickstart import QuickstartConfig, run_quickstart
from ish_tf.train import TrainConfig


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_resumes(tmp_path):
    cfg = QuickstartConfig(
        workdir=str(tmp_path / "qs"),
        synth=SynthConfig(n_genes=20, n_donors=3, donors_per_gene=2, images_per_gene_donor=2,
                          height=128, width=128, seed=0),
        extract=ExtractConfig(manifest="", out_dir="", patches_per_image=4, source_size=64,
                              patch_size=32, max_tries=200, num_shards=2, workers=1),
        model=ModelConfig(input_size=32, seed=0, family=TripletConfig(
            backbone="small_cnn", backbone_weights="none", embedding_dim=16, head_units=32,
            P=4, K=4, mining="batch_all")),
        train=TrainConfig(steps=6, decay_start=5, learning_rate=3e-4, checkpoint_every=3,
                          log_every=3, image_summaries=False),
        embed_batch_size=64)
    logs = []
    summary = run_quickstart(cfg, log=logs.append)

    on_disk = json.load(open(os.path.join(cfg.workdir, "summary.json")))
    assert on_disk == json.loads(json.dumps(summary))
    assert set(summary["rank1"]) == {"trained", "untrained", "random"}
    assert all(0.0 <= v <= 1.0 for v in summary["rank1"].values())
    assert 0.0 < summary["chance"] < 1.0
    assert summary["n_queries"] > 0  # test-split images only
    saved = summary["saved_model"]
    assert os.path.exists(os.path.join(saved, "saved_model.pb"))
    assert os.path.exists(summary["paths"]["report"])
    report = open(summary["paths"]["report"], encoding="utf-8").read()
    assert "About this run" in report and "Gene re-identification" in report
    # The report describes the embeddings it scored, and which rows; no donor matrix is
    # scored, so none is explained.
    assert "<h2>Embeddings</h2>" in report and "--splits=all" in report
    assert "donor_matrix" not in report
    import pandas as pd

    reid = pd.read_csv(summary["paths"]["reid"])
    assert set(reid["splits"]) == {"test"} and "fold_over_chance" in reid.columns
    for name in ("trained", "untrained"):
        assert os.path.exists(os.path.join(cfg.workdir, "embeddings", name, "gene_embeddings.csv"))

    # A rerun reuses every stage's output: same export version, same numbers.
    again = run_quickstart(cfg, log=logs.append)
    assert again["saved_model"] == saved
    assert again["rank1"] == summary["rank1"]
    assert again["seconds"]["training"] < summary["seconds"]["training"]


def test_quickstart_into_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    """bin/quickstart with an unwritable --workdir (a full disk) stops with one line naming
    the path, exit 1, instead of a traceback."""
    import errno

    from faults import failing_writes

    from ish_tf import cli

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    workdir = tmp_path / "qs"
    failing_writes(monkeypatch, str(tmp_path), errno.ENOSPC)
    rc = cli.invoke("quickstart", ["--flagfile=configs/quickstart.cfg",
                                   f"--workdir={workdir}"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"quickstart: error: {workdir}" in err and "No space left on device" in err
    assert "Traceback" not in err

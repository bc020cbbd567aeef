"""Progress lines, plain log lines and lock files: what a user sees during a long stage."""

from __future__ import annotations

import io
import logging as pylogging
import os
import subprocess
import sys
import textwrap

from ish_tf import progress as pg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_steady_lines_off_a_terminal_with_counts_and_eta(monkeypatch):
    monkeypatch.delenv("ISH_TF_PROGRESS", raising=False)
    out = io.StringIO()  # not a terminal
    bar = pg.Progress(10, "train", stream=out, unit="steps", steady_interval=0)
    assert bar.mode == "steady"
    bar.start -= 30  # 30 s ago: 3 steps in 30 s -> 70 s left
    bar.update(3, postfix="loss 0.5000")
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train: 3/10 steps (30%), ")
    assert "about 01:10 left" in lines[0] and lines[0].endswith("loss 0.5000")
    assert "\r" not in out.getvalue()  # plain lines only: nothing redrawn in place
    assert len(lines) == 2  # the closing line, since the work printed one


def test_short_work_off_a_terminal_prints_nothing(monkeypatch):
    monkeypatch.delenv("ISH_TF_PROGRESS", raising=False)
    out = io.StringIO()
    with pg.Progress(5, "extract", stream=out) as bar:  # steady lines every 10 s
        for _ in range(5):
            bar.update()
    assert out.getvalue() == ""


def test_bar_on_a_terminal_and_switches(monkeypatch):
    monkeypatch.delenv("ISH_TF_PROGRESS", raising=False)
    tty = _Tty()
    with pg.Progress(4, "embed", stream=tty, min_interval=0, unit="records") as bar:
        bar.update(4)
    text = tty.getvalue()
    assert "\r" in text and "4/4 records" in text and "100%" in text and text.endswith("\n")
    for env, enabled in (("0", None), ("", False)):
        monkeypatch.setenv("ISH_TF_PROGRESS", env)
        tty = _Tty()
        with pg.Progress(4, "x", enabled, stream=tty, min_interval=0) as bar:
            bar.update(4)
        assert tty.getvalue() == ""


def test_format_seconds():
    assert pg.format_seconds(75) == "01:15"
    assert pg.format_seconds(3725) == "1:02:05"
    assert pg.format_seconds(float("nan")) == "--:--"


# --------------------------------------------------------------------------- log lines
_DEMO = textwrap.dedent('''
    from absl import logging
    from ish_tf.cli import run

    def main(fv, argv):
        logging.info("resumed from step 3")
        logging.info("step 4/9 loss 0.5", extra={"detail": True})
        logging.warning("records are 128 px")
        return 0

    run("demo", lambda fv: None, main, tensorflow=False)
''')


def _demo(tmp_path, *flags):
    path = tmp_path / "demo.py"
    path.write_text(_DEMO)
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, str(path), *flags], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr.splitlines()


def test_log_lines_are_plain_unless_verbosity(tmp_path):
    assert _demo(tmp_path) == ["demo: resumed from step 3", "demo: warning: records are 128 px"]
    verbose = _demo(tmp_path, "--verbosity=0")
    # absl's prefixed format, per-step detail included, when asked for.
    assert len(verbose) == 3 and verbose[0].startswith("I") and "demo.py:" in verbose[0]
    assert verbose[1].endswith("] step 4/9 loss 0.5")


def test_log_file_keeps_absl_prefixes_and_detail(tmp_path):
    from absl import logging

    from ish_tf.cli import log_file

    path = str(tmp_path / "run" / "train.log")
    logger = logging.get_absl_logger()
    level = logger.level
    logger.setLevel(pylogging.INFO)
    try:
        with log_file(path):
            logging.info("step %d", 7, extra={"detail": True})
        logging.info("after the block")
    finally:
        logger.setLevel(level)
    lines = open(path).read().splitlines()
    assert len(lines) == 1 and lines[0].startswith("I") and lines[0].endswith("] step 7")


# --------------------------------------------------------------------------- lock files
def test_a_finished_run_leaves_no_lock_files(tmp_path):
    from ish_tf.data import shards
    from ish_tf.data.patches import exclusive_out_dir

    out = str(tmp_path / "records")
    with exclusive_out_dir(out):
        with shards._locked(out):  # as update_index takes it, once per completed shard
            pass
        assert os.path.exists(os.path.join(out, ".index.lock"))
    assert not [n for n in os.listdir(out) if n.endswith(".lock")], os.listdir(out)


# --------------------------------------------------------------------------- resizing
def test_records_and_model_sizes_that_differ_are_said_once(tmp_path, caplog):
    from ish_tf.data import shards
    from ish_tf.embed import note_size_mismatch
    from ish_tf.train.tasks import note_resize

    records_dir = str(tmp_path / "records")
    shards.write_dataset_info(records_dir, shards.DatasetInfo(
        genes=shards.make_gene_vocabulary(["G1"]), patch_size=128, format="png"))
    line = note_size_mismatch(records_dir, {"input_size": 64})
    assert "records are 128x128 px and the model takes 64x64" in line
    assert note_size_mismatch(records_dir, {"input_size": 128}) == ""
    caplog.clear()
    with caplog.at_level(pylogging.WARNING):
        for _ in range(3):
            note_resize(records_dir, (128, 128), 64)
    said = [r.getMessage() for r in caplog.records if "resized" in r.getMessage()]
    assert len(said) == 1 and "are 128x128 px and the model takes 64x64" in said[0]

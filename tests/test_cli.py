"""The command runner (ish_tf.cli): each command's own flags, renamed flags, replay."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ish_tf import cli, config
from ish_tf.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _helpfull(command: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", f"ish_tf.cli.{command}", "--helpfull"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode in (0, 1), done.stderr[-2000:]  # absl's --helpfull exits 1
    text = done.stdout + done.stderr
    assert "Traceback" not in text, text[-2000:]
    return text


def test_fetch_helpfull_lists_no_training_or_model_flags():
    text = _helpfull("fetch")
    assert "--study" in text and "ish_tf.cli.fetch:" in text
    for name in ("--model", "--steps", "--cdae_", "--triplet_", "--run_dir", "--input_size"):
        assert name not in text, name


def test_train_helpfull_groups_flags_by_family():
    text = _helpfull("train")
    sections = {}
    current = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith(":"):
            current = line.rstrip()[:-1]
            sections[current] = []
        elif current and line.startswith("  --"):  # continuation lines are indented more
            sections[current].append(line.strip().split(":")[0])
    for prefix in ("triplet", "cdae", "unet", "ish_cnn"):
        names = sections[f"ish_tf.families.{prefix}"]
        assert names and all(n.startswith((f"--{prefix}_", f"--[no]{prefix}_")) for n in names), names
    assert "--triplet_P" in sections["ish_tf.families.triplet"]
    assert "--model" in sections["ish_tf.cli.train"] and "--steps" in sections["ish_tf.cli.train"]


def test_defined_flags_only_on_the_given_flag_values():
    from absl import flags

    fv = flags.FlagValues()
    cli.command_module("fetch").define_flags(fv)
    assert "study" in fv and "model" not in fv and "steps" not in fv
    assert "study" not in flags.FLAGS  # nothing defined at import time or on the global FLAGS


@pytest.mark.parametrize("line,new", [("--P=4", "--triplet_P"),
                                      ("--unpool=nearest", "--cdae_unpool"),
                                      ("--nol2_normalize", "--notriplet_l2_normalize"),
                                      ("--mask_dir=x", "--unet_mask_dir")])
def test_old_flagfile_fails_naming_the_new_flag(tmp_path, capsys, line, new):
    path = tmp_path / "old.cfg"
    path.write_text(f"# an old run's flags\n--steps=3\n{line}\n")
    assert cli.invoke("train", [f"--flagfile={path}"]) == 2
    err = capsys.readouterr().err
    assert "train: error:" in err and f"use {new}" in err and str(path) in err


def test_renamed_flag_per_family_and_on_the_command_line(capsys):
    assert cli.invoke("train", ["--model=ish_cnn", "--P=4"]) == 2
    assert "--ish_cnn_P" in capsys.readouterr().err
    assert cli.invoke("tune", ["--head_units=4"]) == 2
    assert "--triplet_head_units" in capsys.readouterr().err


def test_bin_train_renamed_flag_exits_2():
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "ish_tf.cli.train", "--P=4"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2
    assert "train: error: --P (in the command line) was renamed" in done.stderr
    assert "--triplet_P" in done.stderr


def test_unexpected_arguments_and_bad_values_are_usage_errors(capsys):
    assert cli.invoke("export", ["stray"]) == 2
    assert "export: error: unexpected arguments: stray" in capsys.readouterr().err
    assert cli.invoke("train", ["--triplet_P=1", "--records_dir=x"]) == 2
    assert "--triplet_P=1: 1 is not integer >= 2" in capsys.readouterr().err
    assert cli.invoke("train", ["--model=cdae", "--cdae_filters=x"]) == 2
    assert "train: error: --cdae_filters: expected a comma-separated list" in capsys.readouterr().err
    assert cli.invoke("train", ["--no_such_flag=1"]) == 2
    assert "no_such_flag" in capsys.readouterr().err


def test_two_commands_keep_their_own_defaults_for_a_shared_name():
    fetch = cli.parse("fetch", [])
    extract = cli.parse("extract", [])
    ingest = cli.parse("ingest", [])
    assert (fetch.workers, extract.workers, ingest.workers) == (4, 1, 4)
    assert "downloads" in fetch["workers"].help and "processes" in extract["workers"].help
    tools = cli.parse("cdae", [])
    train = cli.parse("train", [])
    assert (tools.split, train.split) == ("test", "train")
    assert (tools.run_dir, train.run_dir) == ("", "runs/triplet")
    # Parsing one leaves the other untouched.
    cli.parse("fetch", ["--workers=9", "--out=/tmp/a"])
    assert cli.parse("extract", []).workers == 1 and cli.parse("extract", []).out == ""


def test_model_config_from_family_flags_and_small_run():
    fv = cli.parse("train", ["--model=cdae", "--cdae_unpool=nearest", "--cdae_filters=8,16",
                             "--cdae_batch_size=32", "--small_run", "--seed=3"])
    mc = train_cli.model_config(fv)
    assert (mc.model, mc.seed, mc.family.unpool, mc.family.filters) == ("cdae", 3, "nearest",
                                                                         (8, 16))
    assert mc.family.batch_size == 8  # shrunk for the smoke run
    fv = cli.parse("train", ["--triplet_P=5", "--triplet_K=3", "--notriplet_l2_normalize"])
    mc = train_cli.model_config(fv)
    assert (mc.family.P, mc.family.K, mc.family.l2_normalize) == (5, 3, False)
    with pytest.raises(ValueError, match="--cdae_filters"):
        train_cli.model_config(cli.parse("train", ["--model=cdae", "--cdae_filters=a,b"]))


def test_flags_cfg_replays_to_the_same_configs(tmp_path):
    argv = ["--model=ish_cnn", "--ish_cnn_P=3", "--ish_cnn_filters=4,8", "--input_size=24",
            "--steps=7", "--run_dir=" + str(tmp_path / "run"), "--noflips"]
    fv = cli.parse("train", argv)
    path = str(tmp_path / "flags.cfg")
    config.write_flagfile(path, fv)
    text = open(path).read()
    assert "--ish_cnn_P=3" in text and "--seed=0" in text and "--noflips" in text
    assert "--logtostderr" not in text  # absl's own flags are not ish_tf's
    again = cli.parse("train", [f"--flagfile={path}"])
    assert train_cli.model_config(again) == train_cli.model_config(fv)
    assert train_cli.train_config(again) == train_cli.train_config(fv)


def test_tune_accepts_every_train_flag():
    from ish_tf.cli import tune

    names = set(tune.train_flag_names())
    fv = cli.parse("tune", [])
    assert names <= set(fv) and "tuner" in fv and "tuner" not in names


# --------------------------------------------------------------------------- --help
COMMANDS = sorted(n for n in os.listdir(os.path.join(ROOT, "bin"))
                  if not n.startswith("_") and n != "test")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_stage_help_lists_its_own_flags_with_defaults(command, capsys):
    from absl import flags

    assert cli.invoke(command, ["--help"]) == 0
    text = capsys.readouterr().out
    fv = flags.FlagValues()
    cli.command_module(command).define_flags(fv)
    own = {f.name: f for m, fs in fv.flags_by_module_dict().items() if m.startswith("ish_tf")
           for f in fs}
    assert own, command
    for name, flag in own.items():
        head = f"--[no]{name} (default: " if flag.boolean else f"--{name}="
        assert f"\n  {head}" in text, (command, name)
    assert "Common flags:\n  --seed=0" in text
    assert "--verbosity" not in text.split("Common flags:")[1].split("Any flag")[0]  # absl's
    assert ("--[no]small_run" in text) == (command in ("quickstart", "synth", "train", "tune"))


def test_train_help_groups_family_flags(capsys):
    assert cli.invoke("train", ["--help"]) == 0
    text = capsys.readouterr().out
    sections = [line for line in text.splitlines() if line and not line.startswith(" ")
                and line.endswith(":")]
    assert sections.index("Common flags:") < sections.index("bin/train flags:")
    triplet = text.split("Family triplet (--model=triplet; its flags are prefixed triplet_):")[1]
    assert "\n  --triplet_P=" in triplet.split("Family ")[0]
    assert "\n  --validate_every=1000" in text


def test_bin_help_is_the_stage_help():
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "ish_tf.cli.ingest", "--help"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "bin/ingest flags:" in done.stdout and "--table=''" in done.stdout
    assert "--small_run" not in done.stdout and "Try --helpfull" not in done.stdout


def test_usage_error_line_comes_first(capsys):
    assert cli.invoke("train", ["--steps=abc"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("train: error: ") and "--steps=abc" in err[0]
    assert err[-1] == "Run bin/train --help for its flags." and len(err) == 2


def test_evaluate_without_task_lists_the_tasks_and_their_needs(capsys):
    assert cli.invoke("evaluate", ["--out=x"]) == 2
    err = capsys.readouterr().err
    first, *rest = err.splitlines()
    assert first == "evaluate: error: --task is required: which evaluation to run"
    listed = "\n".join(rest)
    for task, need in (("annotations", "--annotations"), ("diagnosis", "--manifest"),
                       ("reid", "--embedding")):
        assert f"  {task}" in listed and need in listed


@pytest.mark.parametrize("command", COMMANDS)
def test_help_examples_keep_their_line_breaks(command):
    """A `\\` at a line's end in a docstring joins the lines (the examples then collapse
    into one): the help has at least as many lines as the docstring's source."""
    module = cli.command_module(command)
    with open(module.__file__, encoding="utf-8") as f:
        source_doc = f.read().split('"""')[1]
    assert module.__doc__.count("\n") >= source_doc.count("\n"), command

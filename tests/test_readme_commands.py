"""Every `bin/` command line of the README and of the configs' headers parses as written.

The README is the front door: a flag renamed or removed in code must not leave a command
there that fails for a user. Each line is parsed by its command (flagfiles from configs/
included, nothing is run); lines naming files a user creates first (a run's flags.cfg,
a search's best.cfg) are parsed without those flagfiles.
"""

from __future__ import annotations

import os
import re
import shlex

import pytest

from ish_tf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COMMANDS = {"test", "quickstart"}  # shell scripts without flags of their own, or tested elsewhere


def _command_lines(text: str) -> list[str]:
    """`bin/NAME ...` lines of shell blocks (and config headers), continuations joined."""
    lines, out = text.splitlines(), []
    i = 0
    while i < len(lines):
        line = lines[i].strip().lstrip("#").strip()
        if re.match(r"bin/[a-z_]+ ", line) and "|" not in line and "->" not in line:
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1].rstrip() + " " + lines[i].strip().lstrip("#").strip()
            out.append(line.split("  #")[0].split(" # ")[0].strip())
        i += 1
    return out


def _sources() -> list[tuple[str, str]]:
    found = []
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        found += [("README.md", line) for line in _command_lines(f.read())]
    configs = os.path.join(ROOT, "configs")
    for name in sorted(os.listdir(configs)):
        with open(os.path.join(configs, name), encoding="utf-8") as f:
            header = "\n".join(line for line in f if line.startswith("#"))
        found += [(f"configs/{name}", line) for line in _command_lines(header)]
    return found


COMMANDS = _sources()


def test_the_readme_has_commands():
    names = {line.split()[0] for _, line in COMMANDS}
    assert {"bin/fetch", "bin/extract", "bin/train", "bin/export", "bin/embed",
            "bin/evaluate"} <= names


@pytest.mark.parametrize("source,line", COMMANDS, ids=[f"{s}:{i}" for i, (s, _) in
                                                        enumerate(COMMANDS)])
def test_command_line_parses(source, line, monkeypatch):
    monkeypatch.chdir(ROOT)
    # Shell variables of the examples ($R, a patch size; $S, a folder) as a number.
    words = shlex.split(re.sub(r"\$\{?\w+\}?", "32", line))
    name = words[0].split("/", 1)[1]
    if name in NOT_COMMANDS:
        return
    argv = [w for w in words[1:]
            if not (w.startswith("--flagfile=") and not w.split("=", 1)[1].startswith("configs/"))]
    positional = [w for w in argv if not w.startswith("-")]
    fv = cli.parse(name, argv)
    assert fv is not None, (source, line)
    module = cli.command_module(name)
    if positional:
        assert getattr(module, "ACCEPTS_ARGS", False), (source, line)

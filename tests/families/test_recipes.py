"""The families' quickstart recipes are commands that parse as written.

Running a recipe takes minutes (bin/quickstart --family=NAME); here each of its command
lines is parsed by its command, so a renamed or removed flag fails in seconds, and the
command's own config converters accept the values.
"""

from __future__ import annotations

import os

import pytest

from ish_tf import cli
from ish_tf.families import family_names, get_family, resolve_ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES = [n for n in family_names() if get_family(n).quickstart and n != "triplet"]


def test_the_quickstart_offers_every_family_with_a_recipe():
    fv = cli.parse("quickstart", ["--family=cdae"])
    assert sorted(fv["family"].parser.enum_values) == sorted(["triplet", *RECIPES])
    assert {"cdae", "ish_cnn"} <= set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_commands_parse(name, tmp_path):
    module = resolve_ref(get_family(name).quickstart).__module__
    recipe = __import__(module, fromlist=["recipe"]).recipe
    commands = recipe(str(tmp_path / name), root=ROOT, seed=0)
    assert commands, name
    for stage, command, argv in commands:
        fv = cli.parse(command, argv)
        if "seed" in fv:
            assert fv["seed"].value == 0, (stage, command)
    # The training stage builds the family's model config from its flagfile.
    from ish_tf.cli import train as train_cli

    train_argv = next(argv for _, command, argv in commands if command == "train")
    config = train_cli.model_config(cli.parse("train", train_argv))
    assert config.spec.prefix == get_family(name).prefix

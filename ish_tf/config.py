"""Typed configs at the edge: dataclasses <-> absl flags, and replayable flagfiles.

A family's settings live in one dataclass (its `config.py`), each field with its one
default and a help text (`setting(...)`). `define_flags` turns the fields into absl flags
named `<prefix>_<field>` (`CdaeConfig.unpool` -> `--cdae_unpool`), `from_flags` reads them
back into an instance, and `to_dict`/`from_dict` carry it through JSON
(RUN/model_config.json). Library code takes the dataclass; only `ish_tf/cli` touches absl.

Field types map to flags as: bool -> DEFINE_bool, int -> DEFINE_integer, float ->
DEFINE_float, str with `choices` -> DEFINE_enum, str -> DEFINE_string, tuple[...] ->
a comma-separated DEFINE_string parsed into a tuple of the element type.

Flags renamed when the settings moved into typed configs are listed in `RENAMED_FLAGS`;
`check_renamed_flags` stops a command line or flagfile that still uses one, naming the
new flag.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ish_tf.io_utils import atomic_write_text

#: Module-name prefix of every ish_tf flag (absl groups --helpfull by module name).
FLAG_MODULE_PREFIX = "ish_tf"


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None,  # noqa: A002
            lower: float | None = None, upper: float | None = None,
            flag: bool = True) -> Any:
    """A dataclass field with its flag's help text and validation.

    Args:
      default: the one default (tuples for list settings).
      help: the flag's help text.
      choices: allowed values of a str setting (an enum flag).
      lower, upper: inclusive bounds of a number.
      flag: False for a field that is set by the family itself (e.g. class names read
        from the records) and never from a flag.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "lower": lower,
            "upper": upper, "flag": flag}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default for list settings (dataclass defaults are shared)")
    return dataclasses.field(default=default, metadata=meta)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _element_type(hint: Any) -> type | None:
    """tuple[int, ...] -> int; None for non-tuple hints."""
    if typing.get_origin(hint) is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return args[0] if args else str
    return None


def _base_type(hint: Any) -> Any:
    """Strips Optional: `int | None` -> int."""
    args = typing.get_args(hint)
    if args and type(None) in args and typing.get_origin(hint) is not tuple:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return hint


def flag_name(prefix: str, field_name: str) -> str:
    """`<prefix>_<field>`, or the bare field name with no prefix."""
    return f"{prefix}_{field_name}" if prefix else field_name


def flag_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of `cls` that have flags (see `setting(flag=...)`)."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("flag", True)]


def define_flags(cls: type, prefix: str, flag_values, *, module_name: str | None = None,
                 help_prefix: str = "") -> list[str]:
    """Defines one absl flag per field of dataclass `cls`.

    Args:
      cls: a dataclass whose fields were declared with `setting`.
      prefix: flag-name prefix ("cdae"); "" for bare names.
      flag_values: the absl FlagValues to define them on.
      module_name: the module the flags are listed under in --helpfull.
      help_prefix: text put before each help (e.g. "--model=cdae: ").

    Returns:
      The flag names defined (names already defined are skipped: two families sharing
      one config class define it once).
    """
    from absl import flags

    module_name = module_name or f"{FLAG_MODULE_PREFIX}.{prefix or cls.__name__}"
    hints = _hints(cls)
    names = []
    for field in flag_fields(cls):
        name = flag_name(prefix, field.name)
        if name in flag_values:
            continue
        meta = field.metadata
        hint = _base_type(hints[field.name])
        help_text = help_prefix + meta.get("help", "")
        kw = {"flag_values": flag_values, "module_name": module_name}
        bounds = {k: v for k, v in (("lower_bound", meta.get("lower")),
                                    ("upper_bound", meta.get("upper"))) if v is not None}
        default = field.default
        if _element_type(hint) is not None:
            flags.DEFINE_string(name, ",".join(str(v) for v in default), help_text, **kw)
        elif hint is bool:
            flags.DEFINE_bool(name, default, help_text, **kw)
        elif hint is int:
            flags.DEFINE_integer(name, default, help_text, **bounds, **kw)
        elif hint is float:
            flags.DEFINE_float(name, default, help_text, **bounds, **kw)
        elif meta.get("choices"):
            flags.DEFINE_enum(name, default, list(meta["choices"]), help_text, **kw)
        else:
            flags.DEFINE_string(name, "" if default is None else default, help_text, **kw)
        names.append(name)
    return names


def _parse_tuple(name: str, text: Any, element: type) -> tuple:
    items = text if isinstance(text, (list, tuple)) else str(text or "").split(",")
    items = [str(s).strip() for s in items if str(s).strip()]
    try:
        if element is int:
            return tuple(_as_int(v) for v in items)
        return tuple(element(v) for v in items)
    except ValueError as e:
        raise ValueError(f"--{name}: expected a comma-separated list of "
                         f"{element.__name__}, got {text!r}") from e


def _as_int(text: str) -> int:
    value = float(text)
    if value != int(value):
        raise ValueError(f"{text!r} is not an integer")
    return int(value)


def from_flags(cls: type, prefix: str, flag_values, **overrides: Any):
    """An instance of `cls` from the flags `define_flags` made (validated if it can).

    Flags that were not defined (a command that does not know this family) keep the
    dataclass defaults.

    Args:
      cls: the dataclass.
      prefix: the prefix given to `define_flags`.
      flag_values: parsed absl FlagValues.
      **overrides: field values set directly (not from flags).

    Raises:
      ValueError: a value does not parse or does not validate, naming the flag.
    """
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for field in flag_fields(cls):
        name = flag_name(prefix, field.name)
        if name not in flag_values:
            continue
        value = flag_values[name].value
        element = _element_type(_base_type(hints[field.name]))
        if element is not None:
            value = _parse_tuple(name, value, element)
        kwargs[field.name] = value
    kwargs.update(overrides)
    instance = cls(**kwargs)
    validate = getattr(instance, "validate", None)
    return validate() if callable(validate) else instance


def to_dict(instance: Any) -> dict[str, Any]:
    """JSON-ready dict of a config dataclass (tuples as lists)."""
    return _json_ready(dataclasses.asdict(instance))


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def from_dict(cls: type, data: Mapping[str, Any], what: str = "config") -> Any:
    """Inverse of `to_dict`: lists back to tuples; unknown keys raise.

    Raises:
      ValueError: unknown keys (a newer or foreign file), naming them and `what`.
    """
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{what} has unknown keys {unknown}")
    kwargs = {}
    for key, value in data.items():
        if _element_type(_base_type(hints[key])) is not None and isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------- renames
#: Flags renamed when family settings moved into typed configs: old -> {family: new}.
#: "*" applies whatever the family.
RENAMED_FLAGS: dict[str, dict[str, str]] = {
    "P": {"triplet": "triplet_P", "ish_cnn": "ish_cnn_P"},
    "K": {"triplet": "triplet_K", "ish_cnn": "ish_cnn_K"},
    "mining": {"*": "triplet_mining"},
    "margin": {"*": "triplet_margin"},
    "metric": {"*": "triplet_metric"},
    "backbone": {"*": "triplet_backbone"},
    "backbone_weights": {"*": "triplet_backbone_weights"},
    "embedding_dim": {"*": "triplet_embedding_dim"},
    "head_units": {"triplet": "triplet_head_units", "ish_cnn": "ish_cnn_head_units"},
    "l2_normalize": {"*": "triplet_l2_normalize"},
    "head_batch_norm": {"*": "triplet_head_batch_norm"},
    "unpool": {"*": "cdae_unpool"},
    "val_fraction": {"*": "unet_val_fraction"},
    "mask_manifest": {"*": "unet_mask_manifest"},
    "mask_dir": {"*": "unet_mask_dir"},
}


def _flag_tokens(argv: Iterable[str], seen: set[str] | None = None
                 ) -> Iterable[tuple[str, str, str]]:
    """(name, value, where) for every --flag in argv, following --flagfile= recursively
    (paths as absl reads them: relative to the working directory)."""
    seen = set() if seen is None else seen
    for token in argv:
        if not token.startswith("-") or token in ("-", "--"):
            continue
        body = token.lstrip("-")
        name, _, value = body.partition("=")
        if name == "flagfile" and value:
            for path_item in value.split(","):
                path = os.path.expanduser(path_item.strip())
                if path in seen or not os.path.isfile(path):
                    continue
                seen.add(path)
                with open(path, encoding="utf-8") as f:
                    lines = [line.strip() for line in f
                             if line.strip() and not line.lstrip().startswith(("#", "//"))]
                for sub_name, sub_value, where in _flag_tokens(lines, seen):
                    yield sub_name, sub_value, where if where != "the command line" else path
            continue
        yield name, value, "the command line"


def check_renamed_flags(argv: Sequence[str], defined: Iterable[str] = ()) -> None:
    """Stops a command line or flagfile that uses a flag renamed into a family config.

    Args:
      argv: the command line (argv[0] included or not), flagfiles are followed.
      defined: flag names this command defines (a renamed name a command still
        defines with its own meaning is not an error).

    Raises:
      ValueError: naming the old flag, where it was given, and its new name.
    """
    defined = set(defined)
    tokens = list(_flag_tokens(list(argv)))
    model = next((v for n, v, _ in tokens if n == "model"), "") or "triplet"
    for name, _, where in tokens:
        bare = name[2:] if name.startswith("no") and name[2:] in RENAMED_FLAGS else name
        if bare not in RENAMED_FLAGS or bare in defined:
            continue
        targets = RENAMED_FLAGS[bare]
        new = targets.get(model) or targets.get("*")
        negated = name != bare
        if new:
            hint = f"--{'no' if negated else ''}{new}"
        else:
            hint = " or ".join(f"--{v} (--model={k})" for k, v in targets.items())
        raise ValueError(f"--{name} (in {where}) was renamed when the family settings moved "
                         f"into typed configs: use {hint}")


# --------------------------------------------------------------------------- flagfiles
def write_flagfile(path: str, flag_values, module_prefix: str = FLAG_MODULE_PREFIX) -> None:
    """Writes the values of ish_tf's flags to `path` as a replayable flagfile (atomically).

    Args:
      path: destination.
      flag_values: the parsed FlagValues.
      module_prefix: flags defined under modules with this name prefix are written
        (absl's own logging and flagfile flags are not).
    """
    lines = [f"# Resolved flags, replay with: --flagfile={os.path.basename(path)}"]
    by_module = flag_values.flags_by_module_dict()
    seen: set[str] = set()
    for module in sorted(by_module):
        if not (module == module_prefix or module.startswith(module_prefix + ".")):
            continue
        for flag in sorted(by_module[module], key=lambda f: f.name):
            if flag.name in seen:
                continue
            seen.add(flag.name)
            text = flag.serialize()
            if text:
                lines.append(text)
    atomic_write_text(path, "\n".join(lines) + "\n")


def parse_list(value: str | Sequence[str] | None) -> list[str]:
    """Comma-separated flag text (or an absl list) to a clean list of strings."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else value.split(",")
    return [s.strip() for s in items if s and s.strip()]

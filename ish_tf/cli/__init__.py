"""Entry points behind `bin/*`: parse absl flags, build config objects, call the library.

Each command is one module `ish_tf.cli.<name>` with

    define_flags(fv)      defines the flags the command uses on the FlagValues `fv`
                          (nothing is defined at import time)
    main(fv, argv) -> int runs the command on parsed flags; argv holds the program
                          name and the positional arguments

and ends with `if __name__ == "__main__": run(NAME, define_flags, main)`. `run` (a
process's entry point, on absl's global FLAGS) and `invoke` (tests and library users,
on a fresh FlagValues) share the same checks: renamed flags stop with the new name,
unexpected positional arguments and bad flag values are usage errors (exit 2), Ctrl-C
is exit 130.
"""

from __future__ import annotations

import contextlib
import importlib
import logging as pylogging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType

# Lines TensorFlow's C++ libraries print while it is imported and its devices found, through
# absl before its logging is set up (so TF_CPP_MIN_LOG_LEVEL does not silence most of
# them), that say nothing a user can act on.
_TF_START_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are "
               r"written to STDERR$"),
    re.compile(r"^I\d{4} .*\bport\.cc:\d+\] oneDNN custom operations are on"),
    re.compile(r"^I\d{4} .*\bcpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow"),
)
# Where no CUDA driver is installed at all these two only say that the machine has no GPU;
# a failed cuInit on a machine with a driver is a real problem and is always shown.
_NO_CUDA_DRIVER = re.compile(r"\bcudart_stub\.cc:\d+\] Could not find cuda drivers on your "
                             r"machine")
_CUINIT_FAILED = re.compile(r"\bcuda_platform\.cc:\d+\] failed call to cuInit")


def tensorflow_start_lines(lines: list[str]) -> list[str]:
    """The lines of TensorFlow's start-up output worth showing (see `_TF_START_NOISE`).

    Args:
      lines: what TensorFlow printed to stderr while it was imported and its devices found.

    Returns:
      The lines that are not start-up noise, in order. The missing-driver line and the
      failed cuInit that follows from it are noise only together: a failed cuInit with a
      driver present is kept.
    """
    no_driver = any(_NO_CUDA_DRIVER.search(line) for line in lines)
    return [line for line in lines
            if not any(p.search(line) for p in _TF_START_NOISE)
            and not (no_driver and (_NO_CUDA_DRIVER.search(line) or _CUINIT_FAILED.search(line)))]


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and finds its devices with the start-up noise left out of stderr.

    Everything else TensorFlow prints meanwhile is passed on, and if the import fails all of
    it is. A no-op where TensorFlow is already imported; with TF_CPP_MIN_LOG_LEVEL below 2
    (bin/ sets 2 unless told otherwise) nothing is filtered.
    """
    if "tensorflow" in sys.modules:
        return
    try:
        verbose = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") or 0) < 2
    except ValueError:
        verbose = True
    if verbose:
        import tensorflow as tf

        tf.config.list_physical_devices()
        return
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
            shown = lines if failed else tensorflow_start_lines(lines)
            if shown:
                sys.stderr.write("\n".join(shown) + "\n")
                sys.stderr.flush()


class _QuietTensorFlowInfo(pylogging.Filter):
    """Drops INFO records logged from TensorFlow's own modules (one per checkpoint save)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno > pylogging.INFO or f"{os.sep}tensorflow{os.sep}" not in record.pathname


def quiet_tensorflow_info() -> None:
    """Keeps TensorFlow's start-up noise (`import_tensorflow_quietly`) and its own INFO lines
    (one per checkpoint save, which drown the step lines) out of a command's log; ours stay.
    Commands that use TensorFlow call it first thing."""
    from absl import logging

    import_tensorflow_quietly()
    logging.get_absl_logger().addFilter(_QuietTensorFlowInfo())


# --------------------------------------------------------------------------- log lines
#: Flags of absl's own with which a user asks for absl's log format (prefixes, levels).
_ABSL_LOG_FLAGS = ("verbosity", "logtostderr", "alsologtostderr", "stderrthreshold", "log_dir")


class PlainFormatter(pylogging.Formatter):
    """`name: message`, `name: warning: message` above INFO: no absl prefix
    (`I1202 11:51:02.1 ... trainer.py:326]`), which only a log file or --verbosity shows."""

    def __init__(self, name: str, clear_line: bool = False):
        super().__init__()
        self.name = name
        # On a terminal a progress bar may be drawn on the current line: clear it first
        # (the bar is redrawn below at its next update).
        self.prefix = "\r\033[K" if clear_line else ""

    def format(self, record: pylogging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        level = "" if record.levelno <= pylogging.INFO else f"{record.levelname.lower()}: "
        return f"{self.prefix}{self.name}: {level}{message}"


class _NoDetail(pylogging.Filter):
    """Keeps lines logged with `extra={"detail": True}` (a training run's per-step lines,
    which the progress bar replaces) out of the console; log files keep them."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not getattr(record, "detail", False)


def plain_logging(name: str, fv) -> bool:
    """Console log lines as plain text (`PlainFormatter`), without per-step detail, unless
    the user asked for absl's format with --verbosity (or --logtostderr, --log_dir, ...).

    Returns:
      Whether the plain format was set.
    """
    from absl import logging

    if any(flag in fv and fv[flag].present for flag in _ABSL_LOG_FLAGS):
        return False
    handler = logging.get_absl_handler()
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    handler.setFormatter(PlainFormatter(name, clear_line=tty))
    handler.addFilter(_NoDetail())
    return True


@contextlib.contextmanager
def log_file(path: str) -> Iterator[str]:
    """Also writes every log line of the block, in absl's format with its prefixes and
    the per-step detail, to `path` (appended; a resumed run continues it).

    Yields:
      The path (unchanged); a directory that cannot be written leaves the block
      without a log file rather than failing the command.
    """
    from absl import logging

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        handler = pylogging.FileHandler(path, encoding="utf-8")
    except OSError:
        yield path
        return
    handler.setFormatter(logging.PythonFormatter())
    handler.setLevel(pylogging.INFO)
    logger = logging.get_absl_logger()
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()


# --------------------------------------------------------------------------- defining flags
class FlagDefiner:
    """Short flag definitions on one FlagValues, listed under one module in --helpfull.

    A name that is already defined is skipped (a command that combines sections, e.g.
    the quickstart's synth and extract, shares their --out): the first definition wins
    within one command, never across commands (each has its own FlagValues).
    """

    def __init__(self, flag_values, module_name: str):
        self.fv = flag_values
        self.module_name = module_name

    def _define(self, define: Callable, name: str, *args, **kwargs) -> None:
        if name in self.fv:
            return
        define(name, *args, flag_values=self.fv, module_name=self.module_name, **kwargs)

    def string(self, name: str, default: str | None, help: str, **kw) -> None:  # noqa: A002
        from absl import flags

        self._define(flags.DEFINE_string, name, default, help, **kw)

    def integer(self, name: str, default: int | None, help: str, **kw) -> None:  # noqa: A002
        from absl import flags

        self._define(flags.DEFINE_integer, name, default, help, **kw)

    def float(self, name: str, default: float | None, help: str, **kw) -> None:  # noqa: A002
        from absl import flags

        self._define(flags.DEFINE_float, name, default, help, **kw)

    def bool(self, name: str, default: bool, help: str, **kw) -> None:  # noqa: A002
        from absl import flags

        self._define(flags.DEFINE_bool, name, default, help, **kw)

    def enum(self, name: str, default: str, values: Sequence[str], help: str,  # noqa: A002
             **kw) -> None:
        from absl import flags

        self._define(flags.DEFINE_enum, name, default, list(values), help, **kw)

    def list(self, name: str, default: Sequence[str], help: str, **kw) -> None:  # noqa: A002
        from absl import flags

        self._define(flags.DEFINE_list, name, list(default), help, **kw)


def definer(flag_values, command: str) -> FlagDefiner:
    """A `FlagDefiner` for `ish_tf.cli.<command>`'s flags."""
    return FlagDefiner(flag_values, f"ish_tf.cli.{command}")


def define_common(fv, small_run: bool = True) -> None:
    """--seed, which every command has, and --small_run where it shrinks something.

    Args:
      fv: the command's FlagValues.
      small_run: define --small_run (False for stages where it would mean nothing:
        ingest, export, evaluate, ...).
    """
    d = FlagDefiner(fv, "ish_tf.cli")
    d.integer("seed", 0, "Seed for every random choice of the stage.")
    if small_run:
        d.bool("small_run", False, "Shrink batch sizes, buffers and step counts for a local "
               "smoke run.")


# --------------------------------------------------------------------------- --help
HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def _section_title(module_name: str, command: str) -> str:
    if module_name == "ish_tf.cli":
        return "Common flags"
    if module_name.startswith("ish_tf.families."):
        prefix = module_name.rpartition(".")[2]
        return f"Family {prefix} (--model={prefix}; its flags are prefixed {prefix}_)"
    if module_name == f"ish_tf.cli.{command}":
        return f"bin/{command} flags"
    return f"Flags shared with bin/{module_name.rpartition('.')[2]}"


def _flag_line(flag) -> list[str]:
    """`  --name=DEFAULT` (`--[no]name (default: true)` for a bool), its help below."""
    import textwrap

    if flag.boolean:
        head = f"--[no]{flag.name} (default: {'true' if flag.default else 'false'})"
    else:
        value = flag.default_as_str or "''"
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        head = f"--{flag.name}={value}" if value else f"--{flag.name}=''"
    return [f"  {head}"] + textwrap.wrap((flag.help or "").strip(), width=88,
                                         initial_indent="      ", subsequent_indent="      ")


def help_text(command: str, doc: str | None, fv) -> str:
    """`bin/<command> --help`: the command's description and examples (its module
    docstring), then its own flags with their defaults, grouped: common, the command's,
    sections shared with other stages, one per model family. absl's own flags
    (--verbosity, --flagfile, ...) are left to --helpfull."""
    lines = [(doc or f"bin/{command}").strip(), ""]
    sections = {m: fs for m, fs in fv.flags_by_module_dict().items() if m.startswith("ish_tf")}

    def order(module_name: str) -> tuple:
        return (module_name != "ish_tf.cli", module_name != f"ish_tf.cli.{command}",
                module_name.startswith("ish_tf.families."), module_name)

    seen: set[str] = set()
    for module_name in sorted(sections, key=order):
        flags = [f for f in sorted(sections[module_name], key=lambda f: f.name)
                 if f.name not in seen]
        if not flags:
            continue
        lines.append(_section_title(module_name, command) + ":")
        for flag in flags:
            seen.add(flag.name)
            lines.extend(_flag_line(flag))
        lines.append("")
    lines += ["Any flag can also come from --flagfile=FILE (one --flag=value a line).",
              "--helpfull lists absl's own flags too; --verbosity=0 shows the log lines with "
              "absl's prefixes."]
    return "\n".join(lines) + "\n"


def _wants_help(argv: Sequence[str]) -> bool:
    # Only before a lone "--" (after it everything is positional).
    for arg in argv:
        if arg == "--":
            return False
        if arg in HELP_ARGS:
            return True
    return False


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Turns a ValueError (a flag value a config rejects) into a usage error."""
    from absl import app

    try:
        yield
    except ValueError as e:
        raise app.UsageError(str(e)) from e


# --------------------------------------------------------------------------- running
class _Usage(Exception):
    """A usage error found before `main` runs (renamed flag, unknown flag, bad value)."""


def _check_renamed(argv: Sequence[str], fv) -> None:
    from ish_tf import config

    try:
        config.check_renamed_flags(list(argv[1:]), defined=list(fv))
    except ValueError as e:
        raise _Usage(str(e)) from e


def _usage_exit(name: str, message: str) -> int:
    """The one line that matters first (`name: error: ...`), then where to read more."""
    lines = str(message).strip().splitlines() or [""]
    print(f"{name}: error: {lines[0]}", file=sys.stderr)
    for line in lines[1:]:
        print(f"  {line}", file=sys.stderr)
    print(f"Run bin/{name} --help for its flags.", file=sys.stderr)
    return 2


_tensorflow_quieted = False


def _execute(name: str, fv, argv: Sequence[str], main: Callable, *, accepts_args: bool,
             tensorflow: bool) -> int:
    """Runs `main(fv, argv)` on parsed flags with the shared checks; the exit status."""
    global _tensorflow_quieted
    from absl import app

    if tensorflow and not _tensorflow_quieted:
        quiet_tensorflow_info()  # before any library import brings TensorFlow in
        _tensorflow_quieted = True
    argv = list(argv)
    try:
        if len(argv) > 1 and not accepts_args:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
        status = main(fv, argv)
    except app.UsageError as e:
        return _usage_exit(name, str(e))
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return int(status or 0)


def run(name: str, define_flags: Callable, main: Callable, *, accepts_args: bool = False,
        tensorflow: bool = True) -> None:
    """The entry point of `python -m ish_tf.cli.<name>` (never returns).

    Defines the command's flags on absl's global FLAGS, checks for renamed flags
    (command line and flagfiles), parses, and runs `main(FLAGS, argv)` under absl's
    app.run (logging set up, --helpfull handled).

    Args:
      name: the command (bin/<name>), the prefix of its error messages.
      define_flags: `define_flags(fv)` of the command.
      main: `main(fv, argv) -> int` of the command.
      accepts_args: positional arguments are passed to main (else a usage error).
      tensorflow: the command may import TensorFlow: silence its start-up noise first.
    """
    from absl import app, flags

    fv = flags.FLAGS
    define_flags(fv)
    if _wants_help(sys.argv[1:]):
        main_module = sys.modules.get("__main__")
        sys.stdout.write(help_text(name, getattr(main_module, "__doc__", None), fv))
        sys.exit(0)

    def parse(argv: list[str]) -> list[str]:
        try:
            _check_renamed(argv, fv)
            try:
                return fv(argv)
            except flags.Error as e:
                raise _Usage(str(e)) from e
        except _Usage as e:
            sys.exit(_usage_exit(name, str(e)))

    def entry(argv: list[str]) -> int:
        plain_logging(name, fv)
        return _execute(name, fv, argv, main, accepts_args=accepts_args, tensorflow=tensorflow)

    app.run(entry, flags_parser=parse)


def command_module(module_or_name: ModuleType | str) -> ModuleType:
    """`ish_tf.cli.<name>` for a command name (or the module itself)."""
    if isinstance(module_or_name, str):
        return importlib.import_module(f"ish_tf.cli.{module_or_name}")
    return module_or_name


def invoke(module_or_name: ModuleType | str, argv: Sequence[str] = ()) -> int:
    """Runs a command in this process on its own fresh FlagValues; returns its exit status.

    Args:
      module_or_name: "train" or the module `ish_tf.cli.train`.
      argv: the command line after the command (flags, --flagfile=..., positionals).

    Returns:
      The exit status: main's, 2 for a usage error (printed as `name: error: ...`),
      130 for Ctrl-C.
    """
    from absl import flags

    module = command_module(module_or_name)
    name = getattr(module, "NAME", module.__name__.rpartition(".")[2])
    fv = flags.FlagValues()
    module.define_flags(fv)
    if _wants_help(argv):
        sys.stdout.write(help_text(name, module.__doc__, fv))
        return 0
    full = [name, *argv]
    try:
        _check_renamed(full, fv)
        try:
            rest = fv(full)
        except flags.Error as e:
            raise _Usage(str(e)) from e
    except _Usage as e:
        return _usage_exit(name, str(e))
    return _execute(name, fv, rest, module.main,
                    accepts_args=getattr(module, "ACCEPTS_ARGS", False),
                    tensorflow=getattr(module, "USES_TENSORFLOW", True))


def parse(module_or_name: ModuleType | str, argv: Sequence[str] = ()):
    """A fresh FlagValues with a command's flags parsed from `argv` (no main run).

    For tests and tools that want a command's configs (`train.model_config(fv)`).

    Raises:
      ValueError: a renamed flag; absl.flags.Error: an unknown flag or bad value.
    """
    from absl import flags

    from ish_tf import config

    module = command_module(module_or_name)
    fv = flags.FlagValues()
    module.define_flags(fv)
    full = [getattr(module, "NAME", "cmd"), *argv]
    config.check_renamed_flags(full[1:], defined=list(fv))
    fv(full)
    return fv

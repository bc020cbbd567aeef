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


def define_common(fv) -> None:
    """--seed and --small_run, which every command has."""
    d = FlagDefiner(fv, "ish_tf.cli")
    d.integer("seed", 0, "Seed for every random choice of the stage.")
    d.bool("small_run", False, "Shrink batch sizes, buffers and step counts for a local "
           "smoke run.")


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
    print(f"{name}: error: {message}", file=sys.stderr)
    print(f"Pass --helpfull to list the flags of bin/{name}.", file=sys.stderr)
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

    def parse(argv: list[str]) -> list[str]:
        try:
            _check_renamed(argv, fv)
            try:
                return fv(argv)
            except flags.Error as e:
                raise _Usage(str(e)) from e
        except _Usage as e:
            sys.exit(_usage_exit(name, str(e)))

    app.run(lambda argv: _execute(name, fv, argv, main, accepts_args=accepts_args,
                                  tensorflow=tensorflow), flags_parser=parse)


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

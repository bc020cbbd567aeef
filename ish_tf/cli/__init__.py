"""Entry points behind `bin/*`: parse absl flags, build config objects, call the library."""

from __future__ import annotations

import logging as pylogging
import os
import re
import sys
import tempfile

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

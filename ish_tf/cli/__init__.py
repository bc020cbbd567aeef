"""Entry points behind `bin/*`: parse absl flags, build config objects, call the library."""

from __future__ import annotations

import logging as pylogging
import os


class _QuietTensorFlowInfo(pylogging.Filter):
    """Drops INFO records logged from TensorFlow's own modules (one per checkpoint save)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno > pylogging.INFO or f"{os.sep}tensorflow{os.sep}" not in record.pathname


def quiet_tensorflow_info() -> None:
    """Keeps TensorFlow's own INFO lines out of a command's log (ours stay)."""
    from absl import logging

    logging.get_absl_logger().addFilter(_QuietTensorFlowInfo())

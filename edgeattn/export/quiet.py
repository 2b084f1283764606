"""Silence for the exporters and converters edgeattn drives: their own progress and warnings would bury the CLI's."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet():
    """The dynamo exporter prints progress and warnings on every call; a CLI shows its own progress instead."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        sink = io.StringIO()  # errors still surface as exceptions
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)

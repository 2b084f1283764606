"""The errors edgeattn raises on purpose: one family under :class:`EdgeAttnError`, each with a one-line message that
says what went wrong and what to do.  ``except EdgeAttnError`` catches all of them; :class:`InvalidArgument` is also
a ``ValueError``, as the argument and mask checks raised before the family existed."""


class EdgeAttnError(Exception):
    """A problem the user can fix (bad file, unknown name, unavailable runtime); the message says what to do."""


class InvalidArgument(EdgeAttnError, ValueError):
    """Bad input to the Python API or the CLI: an argument, shape, config, mask, feed or unknown name or option."""


class BadFile(EdgeAttnError):
    """A file or path edgeattn cannot read or write, or one that is not (or does not fit) an edgeattn/ONNX/IR file."""


class RuntimeUnavailable(EdgeAttnError):
    """A runtime, execution provider or optional package (openvino, onnxruntime, matplotlib) this machine lacks."""


class ExportFailed(EdgeAttnError):
    """Tracing, exporting, converting (``edgeattn.convert``, OpenVINO's conversion) or saving a model failed."""


class NoSuchLowering(InvalidArgument):
    """The model's attention has no body for the lowering asked for (routed attention has no ``attention``)."""


def first_line(error: BaseException) -> str:
    """The first line of a (often very long) third-party error, or its type when it has no message."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

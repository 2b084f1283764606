class EdgeAttnError(Exception):
    """A problem the user can fix (bad file, unknown name, unavailable runtime); the message says what to do."""


class NoSuchLowering(EdgeAttnError):
    """The model's attention has no body for the lowering asked for (routed attention has no ``attention``)."""


def first_line(error: BaseException) -> str:
    """The first line of a (often very long) third-party error, or its type when it has no message."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

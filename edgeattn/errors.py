class EdgeAttnError(Exception):
    """A problem the user can fix (bad file, unknown name, unavailable runtime); the message says what to do."""

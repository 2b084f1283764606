from edgeattn.errors import first_line


def test_first_line_of_long_and_empty_errors():
    assert first_line(RuntimeError("  what went wrong\n  at deep.cpp:12\n")) == "what went wrong"
    assert first_line(RuntimeError("")) == "RuntimeError"  # an empty message must not raise IndexError

"""Output files: checked before the work starts, replaced atomically when it is done."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from .errors import BadFile


def check_writable(path) -> Path:
    """Fail early, in one line, when ``path`` cannot become a file (before minutes of export are spent)."""
    if not str(path).strip():
        raise BadFile("output path is empty")
    path = Path(path)
    if path.is_dir():
        raise BadFile(f"{path}: is a directory; give a file path such as {path / 'model.onnx'}")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise BadFile(f"{path}: cannot create it, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadFile(f"{path}: no permission to write in {parent}")
    return path


def atomic_write(path, data: bytes) -> int:
    """Replace ``path`` with ``data``; on any failure (including KeyboardInterrupt) the old file stays.

    The new file keeps the old file's permissions, or gets the usual ones (0666 less the umask)."""
    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise BadFile(f"{path}: cannot write: {e.strerror or e}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)  # mkstemp creates 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise BadFile(f"{path}: cannot write: {e.strerror or e}") from e
        raise
    return len(data)


@contextlib.contextmanager
def staging(path) -> Iterator[Path]:
    """A temporary folder beside ``path`` for an output made of several files (OpenVINO's .xml + .bin): write them
    there, then :func:`publish` them; the folder goes with whatever is left in it, so a failure leaves the old
    files."""
    path = check_writable(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as e:
        raise BadFile(f"{path}: cannot write: {e.strerror or e}") from e
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def publish(moves: Sequence[tuple[Path, Path]]) -> int:
    """Move staged files onto their targets, in order (data before the file that names it); returns their bytes."""
    total = 0
    for src, dst in moves:
        os.chmod(src, stat.S_IMODE(dst.stat().st_mode) if dst.exists() else 0o666 & ~_umask())
        total += src.stat().st_size
        os.replace(src, dst)
    return total


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

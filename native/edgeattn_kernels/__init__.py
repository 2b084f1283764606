"""edgeattn's native kernels: ``openvino_library()`` is the path of an OpenVINO extension;
``core.add_extension(str(openvino_library()))`` before reading an ``edgeattn export --custom-op`` file runs its
dense- and blocked-table attention nodes with edgeattn's fused CPU kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ._built import OPENVINO_VERSION

_HERE = Path(__file__).parent
_SUFFIX = {"win32": ".dll", "darwin": ".so"}.get(sys.platform, ".so")
_PREFIX = "" if sys.platform == "win32" else "lib"


def openvino_library() -> Path:
    """The OpenVINO extension; raises RuntimeError when it was not built or the installed OpenVINO is not the one
    it was built against (an extension only loads into that version)."""
    import openvino

    if openvino.__version__.split("-")[0] != OPENVINO_VERSION.split("-")[0]:
        raise RuntimeError(
            f"edgeattn-kernels' OpenVINO extension was built against OpenVINO {OPENVINO_VERSION}, this is "
            f"{openvino.__version__}; rebuild it: pip install --no-build-isolation --force-reinstall edgeattn-kernels"
        )
    return _library("edgeattn_openvino")


def _library(name: str) -> Path:
    path = _HERE / f"{_PREFIX}{name}{_SUFFIX}"
    if not path.exists():
        raise RuntimeError(f"edgeattn-kernels has no {path.name}; reinstall it")
    return path

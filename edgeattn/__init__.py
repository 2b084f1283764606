"""edgeattn: masked attention from PyTorch to onnxruntime and OpenVINO, with static mask tables."""
__version__ = "0.1.0"

from . import masks, tables  # noqa: E402
from .attention import masked_attention  # noqa: E402
from .errors import EdgeAttnError  # noqa: E402
from .layers import MaskedSelfAttention  # noqa: E402
from .masks import and_masks, materialize, or_masks  # noqa: E402
from .convert import convert, hf_lm as _hf_lm  # noqa: E402
from .export import export_onnx  # noqa: E402
from .plots import plot_mask  # noqa: E402
from .runtimes import load, runtime_names  # noqa: E402

_hf_lm.install()   # transformers' "edgeattn" attention implementation, registered once transformers is imported

__all__ = ["__version__", "masks", "tables", "masked_attention", "EdgeAttnError", "MaskedSelfAttention",
           "and_masks", "or_masks", "materialize", "convert", "export_onnx", "load", "runtime_names", "plot_mask"]

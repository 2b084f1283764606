"""CLEAR: a circular local window on the image grid of a FLUX-like DiT, with the text tokens kept dense.

Reference: Liu et al., "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion Transformers Up",
github.com/Huage001/CLEAR, ``attention_processor.py`` (init_local_mask_flex, LocalFlexAttnProcessor).  FLUX
concatenates the text tokens *before* the image tokens, so a sequence is ``text`` tokens then the ``H x W``
image row-major.  A pair is allowed iff the query or the key is a text token, or both are image tokens with
``dy**2 + dx**2 < radius**2`` on the grid (the disc is truncated at the borders, never shifted).

Queries may be the tail of the keys (``q_len < kv_len``, query i at position ``i + kv_len - q_len``), like the
sequence masks: the image queries alone against every key is the sparse part worth a block table, since text
rows attend every key.
"""

from __future__ import annotations

from ..errors import InvalidArgument
from .base import Mask, Shape, check_int, per_axis


def clear(radius: int, text: int = 0, image=None) -> Mask:
    """CLEAR's local window of ``radius`` (its ``window_size``); ``image=(H, W)`` when ``text`` tokens come first,
    else the tokens are the layer's 2-D grid."""
    radius = check_int("radius", radius, low=1)
    text = check_int("text", text, low=0)
    if image is not None:
        image = per_axis("image", image, 2, low=1)
    elif text:
        raise InvalidArgument(
            f"clear with text={text} needs image=(H, W): the sequence is text tokens then the image, "
            f"so the layer has no grid to take it from"
        )
    name = f"clear_r{radius}" + (f"_text{text}" if text else "") + (f"_img{image[0]}x{image[1]}" if image else "")

    def mods(shape: Shape):
        if image is None:
            height, width = shape.require_grid("clear", (2,))
        else:
            height, width = image
            n = text + height * width
            if shape.kv_len != n or shape.q_len > n or (shape.grid is not None and shape.grid != image):
                raise InvalidArgument(
                    f"{name} needs {n} keys (text={text} + {height}x{width} image) and at most as "
                    f"many queries, got q_len={shape.q_len}, kv_len={shape.kv_len}, "
                    f"grid={shape.grid}"
                )
        offset = shape.kv_len - shape.q_len

        def mask_mod(b, h, q_idx, kv_idx):
            q, k = q_idx + offset - text, kv_idx - text  # image coordinates (negative: a text token)
            dy, dx = q // width - k // width, q % width - k % width
            return (q < 0) | (k < 0) | (dy * dy + dx * dx < radius * radius)

        return mask_mod, None

    if image is None:  # square tiles on the grid, at most 8x8 (block tables flatten bigger tiles anyway)
        hint = {"tile": min(radius, 8)}
    else:  # 1-D tiles along image rows: the largest divisor of W spanning at most a disc diameter
        run = max(t for t in range(1, image[1] + 1) if image[1] % t == 0 and t <= 2 * radius)
        hint = {"tile": run, "offset": text}
    return Mask(name, mods, hint)

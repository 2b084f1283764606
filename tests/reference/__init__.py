"""Brute-force references the tests compare the package against: plain loops written from the published definitions
(NATTEN, Swin, Radial Attention, CLEAR, RMT, PPMA, FlexAttention's mask_mod signature), not from the package.

Test modules import them from here (``from reference.masks import ref_neighborhood``), never from each other; pytest
puts tests/ on sys.path (rootdir-based "prepend" import mode, no tests/__init__.py).  Nothing here is collected: no
module or function name starts with ``test``.

- :mod:`reference.masks`: boolean masks (NATTEN neighborhoods, Swin windows, sequence predicates, Radial, CLEAR).
- :mod:`reference.mods`: FlexAttention-signature mask_mods/bias_mods, a scalar loop evaluating them, shared cases.
- :mod:`reference.decay`: RMT's retention decay biases.
- :mod:`reference.rpb`: NATTEN's and Swin's relative position bias indices.
- :mod:`reference.polyline`: PPMA's polyline path sums.
- :mod:`reference.attention`: masked softmax attention, NATTEN's and PPMA's attention.
"""

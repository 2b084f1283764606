"""The host side of an exported LM (edgeattn.lmloop): cache writes and the choice of the next token."""

import numpy as np

from edgeattn import lmloop

CONFIG = {"kv_heads": 1, "head_dim": 2, "layers": [{"window": 4, "slots": 4}, {"window": None, "slots": 10}]}


def test_a_ring_keeps_the_last_window_positions_at_position_mod_window():
    cache = lmloop.Cache(CONFIG, batch=2)
    new = np.arange(2 * 6 * 2, dtype=np.float32).reshape(2, 1, 6, 2)  # 6 new keys per row
    outputs = {f"present.{i}.{kind}": new for i in range(2) for kind in ("key", "value")}
    # row 0: positions 3..8 (6 tokens); row 1: positions 0..1 (2 real tokens, 4 padding)
    written = cache.write(outputs, np.array([3, 0]), np.array([6, 2]))
    ring, full = cache.arrays["past_key_values.0.key"], cache.arrays["past_key_values.1.key"]
    # positions 5..8 survive in the ring, at 5%4=1, 6%4=2, 7%4=3, 8%4=0: new tokens 2, 3, 4, 5
    np.testing.assert_array_equal(ring[0, 0, [1, 2, 3, 0]], new[0, 0, 2:6])
    np.testing.assert_array_equal(full[0, 0, 3:9], new[0, 0])
    np.testing.assert_array_equal(full[1, 0, :2], new[1, 0, :2])
    assert not full[1, 0, 2:].any() and not ring[1, 0, 2:].any()  # padding never reaches a cache
    assert written == 2 * 8 * (4 + 6 + 2 + 2)  # keys and values of 2 floats: only real tokens, the ring's last 4


def test_choice_greedy_top_k_top_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    assert lmloop.choose(logits, rng, 0.0, 0, 1.0).tolist() == [0]
    assert lmloop.choose(logits, rng, 1.0, 1, 1.0).tolist() == [0]  # top_k=1 is greedy
    # top_p=0.7: 0.5, then 0.3 (0.5 < 0.7 before it), not 0.15 (0.8 >= 0.7 before it)
    picks = {int(lmloop.choose(logits, rng, 1.0, 0, 0.7)[0]) for _ in range(200)}
    assert picks == {0, 1}
    picks = {int(lmloop.choose(logits, rng, 1.0, 3, 1.0)[0]) for _ in range(400)}
    assert picks == {0, 1, 2}
    counts = np.bincount([int(lmloop.choose(logits, rng, 1.0, 0, 1.0)[0]) for _ in range(4000)], minlength=4)
    np.testing.assert_allclose(counts / 4000, [0.5, 0.3, 0.15, 0.05], atol=0.03)

"""Rotary position embeddings: LLaMA 3 and linear frequency scaling, the rotation's invariants."""

import math

import numpy as np
import pytest

from llm.modeling import rope
from llm.modeling.config import preset


def test_rope_llama3_scaling_by_hand():
    # head_dim 8, theta 1e4: base frequencies 1, 0.1, 0.01, 0.001, wavelengths 2*pi * (1, 10,
    # 100, 1000). With an original context of 64 and factors 1 / 4 the thresholds are 64 and 16:
    # 6.3 stays, 62.8 is on the ramp, 628 and 6283 are slowed 8x.
    s = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    ramp = (64 / (2 * math.pi / 0.1) - 1.0) / 3.0
    want = [1.0, (1 - ramp) * 0.1 / 8 + ramp * 0.1, 0.01 / 8, 0.001 / 8]
    np.testing.assert_allclose(rope.inv_freq(8, 10000.0, s), want, rtol=1e-6)
    # LLaMA 3.1-8B: the highest frequency is untouched, the lowest is divided by 8.
    f = rope.inv_freq_for(preset("llama3-8b"))
    assert f.dtype == np.float32 and f.shape == (64,)
    assert f[0] == 1.0
    assert f[-1] == pytest.approx(500000.0 ** (-126 / 128) / 8, rel=1e-6)
    wavelen = 2 * math.pi / 500000.0 ** (-np.arange(0, 128, 2) / 128)
    mid = np.flatnonzero((wavelen > 8192 / 4) & (wavelen < 8192))
    assert mid.size > 0
    for j in mid:
        base = 500000.0 ** (-2 * j / 128)
        r = (8192 / wavelen[j] - 1) / 3
        assert f[j] == pytest.approx((1 - r) * base / 8 + r * base, rel=1e-6)


def test_rope_linear_and_rotation():
    plain = rope.inv_freq(16, 10000.0)
    np.testing.assert_allclose(
        rope.inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0}), plain / 4, rtol=1e-7
    )
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((2, 1, 1, 16), dtype=np.float32)
    cos, sin = rope.cos_sin(plain, [0])
    np.testing.assert_array_equal(rope.apply_rope(q, cos, sin), q)  # position 0: identity
    # Scores depend only on the distance between positions.
    dots = []
    for m, n in [(5, 2), (13, 10), (103, 100)]:
        cm, sm = rope.cos_sin(plain, [m])
        cn, sn = rope.cos_sin(plain, [n])
        dots.append(float(np.sum(rope.apply_rope(q, cm, sm) * rope.apply_rope(k, cn, sn))))
    np.testing.assert_allclose(dots, dots[0], rtol=1e-4)
    # Feature j pairs with j + D/2, and the rotation keeps each pair's length.
    cos, sin = rope.cos_sin(plain, [7])
    r = rope.apply_rope(q, cos, sin)[0, 0]
    np.testing.assert_allclose(
        r[:8] ** 2 + r[8:] ** 2, q[0, 0, :8] ** 2 + q[0, 0, 8:] ** 2, rtol=1e-5
    )


@pytest.mark.parametrize("tk, g", [(4, 1), (6, 3), (8, 4)])
def test_one_pass_rotation_is_rope_pairs_bit_for_bit(tk, g):
    """The engines rotate a core's ``q | k`` features in one pass with
    :func:`llm.modeling.functional.rope_plan`; it must give :func:`F.rope_pairs`' values exactly."""
    from llm.modeling import functional as F

    rng = np.random.default_rng(tk * g)
    rows = 5
    q = rng.standard_normal((rows, tk * g)).astype(np.float32)  # feature j * g + h
    k = rng.standard_normal((rows, tk)).astype(np.float32)
    theta = rng.uniform(0, 50, (rows, tk)).astype(np.float32)
    theta[:, 1::2] = theta[:, 0::2]  # a pair shares its angle
    cos, sin = np.cos(theta), np.sin(theta)
    angle, partner, sign = F.rope_plan(tk, g)
    qk = np.concatenate([q, k], axis=1)
    got = qk * cos[:, angle] + qk[:, partner] * (sin[:, angle] * sign)
    want_q = F.rope_pairs(q.reshape(rows, tk, g), cos, sin).reshape(rows, tk * g)
    want_k = F.rope_pairs(k[..., None], cos, sin)[..., 0]
    np.testing.assert_array_equal(got, np.concatenate([want_q, want_k], axis=1))

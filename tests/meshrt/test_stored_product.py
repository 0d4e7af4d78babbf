"""The rank's products of aggregated MeshGEMM (:func:`meshrt.movers.stored.stored_product`):
batched per K segment or as whole GEMMs, B by identity or where it is held (``b_ids``), float32 or
16-bit words, grouped or not, all equal to the sum over K segments."""

import numpy as np
import pytest

from meshrt.movers.stored import stored_product
from meshrt.precision import from_bf16_words, to_words


def expected(a, b, ids, col_groups=None):
    r, nl, tmb = a.shape[:3]
    c, tnb = b.shape[1], b.shape[3]
    out = np.zeros((r, c, tmb, tnb))
    for ci in range(c):
        for i in range(nl):
            k = ids[ci, i]
            if col_groups is None:
                out[:, ci] += a[:, k].astype(np.float64) @ b[i, ci]
            else:
                groups = col_groups.shape[1]
                a5 = a[:, k].reshape(r, tmb, -1, groups)
                for f in range(tnb):
                    g = np.flatnonzero(col_groups[ci * tnb + f])
                    if g.size:
                        out[:, ci, :, f] += a5[:, :, :, g[0]] @ b[i, ci, :, f]
    return out


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("chunk_bytes", [64 << 20, 1])  # batched; whole GEMMs
def test_stored_product_is_the_sum_over_k_segments(held, chunk_bytes):
    rng = np.random.default_rng(0)
    r, nl, tmb, tkb, c, tnb = 3, 4, 5, 40, 2, 6
    a = rng.standard_normal((r, nl, tmb, tkb)).astype(np.float32)
    b = rng.standard_normal((nl, c, tkb, tnb)).astype(np.float32)
    ids = np.array([rng.permutation(nl) for _ in range(c)]) if held else None
    got = stored_product(a, b, chunk_bytes=chunk_bytes, b_ids=ids)
    want = expected(a, b, np.broadcast_to(np.arange(nl), (c, nl)) if ids is None else ids)
    assert got.shape == (r, c, tmb, tnb) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_stored_product_widens_bfloat16_words_where_they_are_held():
    rng = np.random.default_rng(1)
    r, nl, tmb, tkb, c, tnb = 2, 3, 4, 33, 3, 5
    a = rng.standard_normal((r, nl, tmb, tkb)).astype(np.float32)
    words = to_words(rng.standard_normal((nl, c, tkb, tnb)).astype(np.float32), "bfloat16")
    ids = np.array([np.roll(np.arange(nl), j) for j in range(c)])
    want = expected(a, from_bf16_words(words), ids)
    for chunk in (64 << 20, 1):
        got = stored_product(a, words, chunk_bytes=chunk, b_ids=ids)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_grouped_stored_product_with_held_tiles():
    rng = np.random.default_rng(2)
    r, nl, tmb, tkb, c, tnb, groups = 2, 3, 4, 6, 2, 5, 3
    a = rng.standard_normal((r, nl, tmb, tkb * groups)).astype(np.float32)
    b = rng.standard_normal((nl, c, tkb, tnb)).astype(np.float32)
    labels = rng.integers(0, groups + 1, c * tnb)  # groups + 1: a padding column
    col_groups = np.zeros((c * tnb, groups), np.float32)
    real = labels < groups
    col_groups[np.flatnonzero(real), labels[real]] = 1
    ids = np.array([rng.permutation(nl) for _ in range(c)])
    got = stored_product(a, b, col_groups, b_ids=ids)
    np.testing.assert_allclose(got, expected(a, b, ids, col_groups), rtol=1e-4, atol=1e-4)

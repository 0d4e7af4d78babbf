"""Prefill's local work without the fabric: the softmax's key maximum."""

import numpy as np
import pytest

from llm.engine.prefill import _keys_max


@pytest.mark.parametrize("keys", [1, 2, 3, 7, 11, 16])
def test_keys_max_is_numpys_max_over_the_keys(keys):
    rng = np.random.default_rng(keys)
    s = rng.standard_normal((2, 3, 4, 2, keys, 3)).astype(np.float32)
    s[rng.random(s.shape) < 0.3] = -np.inf  # masked keys
    s[0, 0, 0, 0] = -np.inf  # a row with every key masked
    np.testing.assert_array_equal(_keys_max(s), s.max(axis=4))

"""The dense numpy reference model against golden HF transformers fixtures, its KV cache and GQA
attention. No MPI, no torch. (Configs, RoPE and the weights check have their own files here;
checkpoint reading is tested in ``tests/llm/storage/test_checkpoint.py``, sampling and tokenizers
in ``tests/llm/text/``.)

Fixtures (``tests/fixtures/<name>/``) come from ``tools/make_fixtures.py``. Measured with
transformers 5.24 / torch 2.13: max |logit difference| 6.8e-6 (tiny-llama-gqa) and 4.3e-6
(tiny-qwen2) for logits of standard deviation ~1.4; torch itself differs by up to 8.7e-6 between
its cached and uncached runs. The tolerance (``goldens.ATOL``) is ten times that.
"""

import numpy as np
import pytest
from goldens import ATOL, golden

from llm.modeling.config import preset
from llm.modeling.reference import ReferenceModel, attention
from llm.storage.checkpoint import random_weights

FIXTURE_NAMES = ["tiny-llama-gqa", "tiny-qwen2"]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_reference_matches_transformers(name):
    config, weights, exp = golden(name)
    model = ReferenceModel(config, weights)
    prefill = model.prefill(exp["prompt_ids"])
    assert prefill.dtype == np.float32 and prefill.shape == exp["prefill_logits"].shape
    np.testing.assert_allclose(prefill, exp["prefill_logits"], rtol=0, atol=ATOL)
    for i, token in enumerate(exp["greedy_ids"]):
        np.testing.assert_allclose(
            model.decode(token),
            exp["decode_logits"][i],
            rtol=0,
            atol=ATOL,
            err_msg=f"decode step {i}",
        )
    ids = ReferenceModel(config, weights).generate(
        exp["prompt_ids"], len(exp["greedy_ids"]), stop_ids=()
    )
    assert ids == exp["greedy_ids"].tolist()


def test_generate_stops_at_eos():
    config, weights, exp = golden("tiny-llama-gqa")
    greedy = exp["greedy_ids"].tolist()
    assert 2 in greedy  # the fixture's greedy path emits its EOS id
    streamed = []
    ids = ReferenceModel(config, weights).generate(exp["prompt_ids"], 16, on_token=streamed.append)
    assert ids == greedy[: greedy.index(2) + 1] == streamed


def test_reference_cache_consistency_and_limits():
    config = preset("tiny-llama")
    model = ReferenceModel(config, random_weights(config, seed=3))
    tokens = [1, 40, 41, 300, 7, 99, 5]
    full = model.prefill(tokens)
    model.prefill(tokens[:3])
    steps = np.stack([model.decode(t) for t in tokens[3:]])
    np.testing.assert_allclose(steps, full[3:], rtol=0, atol=1e-5)
    assert model.position == len(tokens)
    with pytest.raises(ValueError, match="exceeds the context"):
        model.generate([1] * 500, 20)
    with pytest.raises(ValueError, match="token ids"):
        model.prefill([config.vocab_size])


def test_attention_gqa_matches_repeated_heads():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((3, 6, 4), dtype=np.float32)  # 6 query heads at positions 2..4
    k, v = rng.standard_normal((2, 5, 2, 4), dtype=np.float32)  # 2 KV heads, 5 positions
    out = attention(q, k, v, start=2).reshape(3, 6, 4)
    for h in range(6):
        kh, vh = k[:, h // 3], v[:, h // 3]  # query head h reads KV head h // 3
        for t in range(3):
            s = kh[: 3 + t] @ q[t, h] / 2.0
            p = np.exp(s - s.max())
            np.testing.assert_allclose(out[t, h], (p / p.sum()) @ vh[: 3 + t], atol=1e-6)

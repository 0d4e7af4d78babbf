"""The model maths: config parsing, RoPE, the weights check and the reference model against
golden HF transformers fixtures. No MPI, no torch. (Checkpoint reading is tested in
``tests/llm/storage/test_checkpoint.py``, sampling and tokenizers in ``tests/llm/text/``.)

Fixtures (``tests/fixtures/<name>/``) come from ``tools/make_fixtures.py``. Measured with
transformers 5.24 / torch 2.13: max |logit difference| 6.8e-6 (tiny-llama-gqa) and 4.3e-6
(tiny-qwen2) for logits of standard deviation ~1.4; torch itself differs by up to 8.7e-6 between
its cached and uncached runs. The tolerance (``goldens.ATOL``) is ten times that.
"""

import json
import math

import numpy as np
import pytest
from goldens import ATOL, FIXTURES, golden

from llm.modeling import rope
from llm.modeling.config import PRESETS, ConfigError, ModelConfig, preset
from llm.modeling.reference import ReferenceModel, attention
from llm.modeling.weights import CheckpointError, check_weights
from llm.storage.checkpoint import (
    random_weights,
)

FIXTURE_NAMES = ["tiny-llama-gqa", "tiny-qwen2"]

# Meta-Llama-3.1-8B's config.json as transformers 4 writes it.
LLAMA31_V4 = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def llama31_v5():
    """The same model in the transformers 5 layout."""
    d = {
        k: v
        for k, v in LLAMA31_V4.items()
        if k not in ("rope_theta", "rope_scaling", "torch_dtype")
    }
    d["rope_parameters"] = dict(LLAMA31_V4["rope_scaling"], rope_theta=500000.0)
    d["dtype"] = "bfloat16"
    d["head_dim"] = 128
    return d


# ---------------------------------------------------------------------- config
def test_config_transformers4_and_5_layouts_agree():
    c4 = ModelConfig.from_hf_dict(LLAMA31_V4)
    c5 = ModelConfig.from_hf_dict(llama31_v5())
    assert c4 == c5
    assert c4 == preset("llama3-8b").replace(name="")
    assert c4.head_dim == 128 and c4.group_size == 4 and c4.dtype == "bfloat16"
    assert c4.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert c4.eos_ids == (128001,)


def test_config_of_fixtures():
    llama = ModelConfig.from_json(FIXTURES / "tiny-llama-gqa")
    assert (llama.family, llama.num_heads, llama.num_kv_heads, llama.head_dim) == ("llama", 6, 2, 8)
    assert llama.rope_scaling["rope_type"] == "llama3"
    assert llama.rope_scaling["original_max_position_embeddings"] == 64
    assert not llama.attention_bias and not llama.tie_word_embeddings
    assert llama.bos_token_id == 1 and llama.eos_ids == (2,)
    qwen = ModelConfig.from_json(FIXTURES / "tiny-qwen2")
    assert qwen.family == "qwen2" and qwen.attention_bias and not qwen.attention_out_bias
    assert qwen.tie_word_embeddings and qwen.head_dim == 8 and qwen.rope_scaling is None
    assert qwen.eos_ids == (149, 150) and qwen.sliding_window is None
    assert "lm_head.weight" not in qwen.tensor_shapes()
    assert qwen.tensor_shapes()["model.layers.1.self_attn.k_proj.bias"] == (8,)


@pytest.mark.parametrize("name", list(PRESETS))
def test_config_round_trips(name):
    c = preset(name)
    d = json.loads(json.dumps(c.to_dict()))
    assert ModelConfig.from_dict(d) == c
    assert ModelConfig.from_hf_dict(c.to_hf_dict(), name=name) == c


@pytest.mark.parametrize(
    "name, billions",
    [("llama3-8b", 8.03), ("llama2-13b", 13.0), ("codellama-34b", 33.7), ("qwen2-72b", 72.7)],
)
def test_preset_sizes(name, billions):
    assert preset(name).num_parameters() / 1e9 == pytest.approx(billions, rel=0.01)
    assert preset(name, layers=2).num_layers == 2
    assert 90e6 < preset("llama-100m").num_parameters() < 110e6


def test_config_errors():
    base = dict(LLAMA31_V4)
    with pytest.raises(ConfigError, match="num_kv_heads=5 does not divide"):
        ModelConfig.from_hf_dict(dict(base, num_key_value_heads=5))
    with pytest.raises(ConfigError, match="not divisible by num_attention_heads"):
        ModelConfig.from_hf_dict(dict(base, num_attention_heads=30))
    with pytest.raises(ConfigError, match="must be even"):
        ModelConfig.from_hf_dict(dict(base, head_dim=7))
    with pytest.raises(ConfigError, match="not supported"):
        ModelConfig.from_hf_dict(dict(base, model_type="gpt2"))
    with pytest.raises(ConfigError, match="lacks required keys"):
        ModelConfig.from_hf_dict({k: v for k, v in base.items() if k != "vocab_size"})
    with pytest.raises(NotImplementedError, match="yarn"):
        ModelConfig.from_hf_dict(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        ModelConfig.from_hf_dict(dict(base, eos_token_id=[128001, 200000]))
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("gpt-5")
    with pytest.raises(ConfigError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict(dict(preset("tiny-llama").to_dict(), colour="red"))


def test_config_explicit_head_dim_and_linear_rope():
    c = ModelConfig.from_hf_dict(
        dict(
            LLAMA31_V4,
            hidden_size=5120,
            head_dim=128,
            rope_scaling={"type": "linear", "factor": 2.0},
        )
    )
    assert c.q_size == 4096 and c.hidden_size == 5120
    assert c.tensor_shapes()["model.layers.0.self_attn.o_proj.weight"] == (5120, 4096)
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_config_mistral_sliding_window():
    d = dict(
        LLAMA31_V4,
        model_type="mistral",
        architectures=["MistralForCausalLM"],
        vocab_size=32000,
        bos_token_id=1,
        eos_token_id=2,
        rope_scaling=None,
        max_position_embeddings=32768,
        sliding_window=4096,
    )
    with pytest.raises(NotImplementedError, match="sliding-window"):
        ModelConfig.from_hf_dict(d)
    c = ModelConfig.from_hf_dict(d, max_context=4096)
    assert c.family == "mistral" and c.max_position_embeddings == 4096
    assert ModelConfig.from_hf_dict(dict(d, sliding_window=None)).sliding_window is None
    # Qwen2 ignores its window unless use_sliding_window is set.
    q = dict(d, model_type="qwen2", use_sliding_window=False)
    assert ModelConfig.from_hf_dict(q).attention_bias
    with pytest.raises(NotImplementedError):
        ModelConfig.from_hf_dict(dict(q, use_sliding_window=True))


# ---------------------------------------------------------------------- RoPE
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


# ---------------------------------------------------------------------- reference vs HF
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


# ---------------------------------------------------------------------- checkpoints
def test_check_weights_reports_mismatches():
    config = preset("tiny-llama")
    shapes = dict(config.tensor_shapes())
    check_weights(config, shapes)
    del shapes["model.norm.weight"]
    shapes["model.layers.0.self_attn.q_norm.weight"] = (16,)
    shapes["lm_head.weight"] = (10, 64)
    with pytest.raises(CheckpointError, match="1 missing.*1 unexpected.*1 with wrong shapes"):
        check_weights(config, shapes)

"""Model configs: HF config.json layouts (transformers 4 and 5), presets, errors, RoPE and
sliding-window variants."""

import json

import pytest
from goldens import FIXTURES

from llm.modeling.config import PRESETS, ConfigError, ModelConfig, preset

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

"""Reading and writing checkpoints: lazy and sharded safetensors, bfloat16 words, half-precision
model directories, and the deterministic random weights. No MPI, no torch."""

import json
import struct

import numpy as np
import pytest
from goldens import ATOL, FIXTURES, golden

from llm.modeling.config import preset
from llm.modeling.reference import ReferenceModel
from llm.modeling.weights import CheckpointError, check_weights
from llm.storage.checkpoint import (
    Checkpoint,
    SafetensorsFile,
    bf16_to_f32,
    f32_to_bf16_words,
    load_checkpoint,
    random_tensor,
    random_weights,
    save_model_dir,
)


def test_lazy_and_sharded_checkpoints(tmp_path):
    from safetensors.numpy import save_file

    config, weights, exp = golden("tiny-qwen2")
    lazy = Checkpoint(FIXTURES / "tiny-qwen2")
    assert set(lazy) == set(weights) and "lm_head.weight" not in lazy
    for name in weights:
        np.testing.assert_array_equal(lazy[name], weights[name])
    # Split into two shards with an index, the way HF shards large models.
    names = sorted(weights)
    parts = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for fname, part in parts.items():
        save_file({n: weights[n] for n in part}, str(tmp_path / fname))
    index = {
        "metadata": {"total_size": 0},
        "weight_map": {n: f for f, part in parts.items() for n in part},
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((FIXTURES / "tiny-qwen2" / "config.json").read_text())
    config2, sharded = load_checkpoint(tmp_path)
    assert config2 == config.replace(name=tmp_path.name)
    for name in weights:
        np.testing.assert_array_equal(sharded[name], weights[name])
    logits = ReferenceModel(config2, Checkpoint(tmp_path)).prefill(exp["prompt_ids"])
    np.testing.assert_allclose(logits, exp["prefill_logits"], rtol=0, atol=ATOL)
    # A shard that went missing, and a truncated file, are reported by name.
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing checkpoint file"):
        load_checkpoint(tmp_path)
    data = (tmp_path / "model-00001-of-00002.safetensors").read_bytes()
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path)


def write_bf16_by_hand(path, tensors):
    """A safetensors file from its specification: u64 header length, JSON header, raw data."""
    header, blob = {"__metadata__": {"format": "pt"}}, b""
    for name, words in tensors.items():
        data = np.asarray(words, dtype="<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(np.shape(words)),
            "data_offsets": [len(blob), len(blob) + len(data)],
        }
        blob += data
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob)


def test_bf16_reading(tmp_path):
    # bf16 is the top half of float32: 0x3F80 = 1.0, 0xC020 = -2.5, 0x4049 = 3.140625,
    # 0x3B80 = 2**-8, 0x0000 = 0, 0x7F80 = inf.
    words = np.array([[0x3F80, 0xC020, 0x4049], [0x3B80, 0x0000, 0x7F80]], dtype=np.uint16)
    write_bf16_by_hand(tmp_path / "w.safetensors", {"a": words, "b": words[0]})
    f = SafetensorsFile(tmp_path / "w.safetensors")
    assert f.dtype("a") == "BF16" and f.shape("a") == (2, 3)
    a = f.get("a")
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, [[1.0, -2.5, 3.140625], [2.0**-8, 0.0, np.inf]])
    np.testing.assert_array_equal(f.get("b"), [1.0, -2.5, 3.140625])
    # Rounding to bf16 is to nearest, ties to even.
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.nan], dtype=np.float32)
    back = bf16_to_f32(f32_to_bf16_words(x))
    np.testing.assert_array_equal(back[:4], [1.0, 1.0, 1.0 + 4 * 2**-8, -2.5])
    assert np.isnan(back[4])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_save_and_load_half_precision(tmp_path, dtype):
    config = preset("tiny-llama", layers=1)
    weights = random_weights(config, seed=5)
    save_model_dir(tmp_path, config, weights, dtype=dtype)
    config2, loaded = load_checkpoint(tmp_path)
    assert config2.dtype == dtype and config2.replace(dtype="float32", name="") == config.replace(
        name=""
    )
    ckpt = Checkpoint(tmp_path)
    assert {ckpt.dtype(n) for n in ckpt} == {"F16" if dtype == "float16" else "BF16"}
    for name, w in weights.items():
        assert loaded[name].dtype == np.float32
        np.testing.assert_allclose(loaded[name], w, rtol=2**-8, atol=1e-7)


def test_random_weights_are_deterministic_and_sliceable():
    config = preset("tiny-llama")
    w = random_weights(config, seed=11)
    check_weights(config, w)
    emb = w["model.embed_tokens.weight"]
    np.testing.assert_array_equal(random_tensor(config, "model.embed_tokens.weight", 11), emb)
    np.testing.assert_array_equal(
        random_tensor(config, "model.embed_tokens.weight", 11, rows=slice(50, 170)), emb[50:170]
    )
    assert not np.array_equal(random_tensor(config, "model.embed_tokens.weight", 12), emb)
    assert abs(float(emb.std()) - 0.02) < 0.002
    norm = w["model.layers.0.input_layernorm.weight"]
    assert abs(float(norm.mean()) - 1.0) < 0.05
    # Large presets: one row block of the LLaMA3-8B embeddings without the rest.
    big = preset("llama3-8b")
    rows = random_tensor(big, "model.embed_tokens.weight", 0, rows=slice(128000, 128010))
    assert rows.shape == (10, 4096)
    with pytest.raises(KeyError):
        random_tensor(config, "model.layers.9.mlp.up_proj.weight", 0)


# ---------------------------------------------------------------------- sampling

"""Text in and out: the sampler (greedy, temperature, top-k / top-p, seeded) and the tokenizers
(byte-level fallback, HF ``tokenizer.json``) with streaming decode. No MPI, no torch."""

import numpy as np
import pytest
from goldens import FIXTURES

from llm.modeling.config import preset
from llm.text.sampling import Sampler
from llm.text.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer


def test_sampler_greedy_and_determinism():
    logits = np.array([0.5, 2.0, -1.0, 2.0, 1.9], dtype=np.float32)
    assert Sampler()(logits) == 1  # argmax, lowest index among ties
    assert Sampler(temperature=0.7, top_k=1, seed=3)(logits) == 1
    draws = [Sampler(temperature=1.0, seed=42) for _ in range(2)]
    seq_a = [draws[0](logits) for _ in range(50)]
    seq_b = [draws[1](logits) for _ in range(50)]
    assert seq_a == seq_b
    other = Sampler(temperature=1.0, seed=43)
    assert seq_a != [other(logits) for _ in range(50)]
    assert set(seq_a) > {1, 3}  # it does sample, not just take the argmax
    for bad in (dict(temperature=-1), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampler(**bad)


def test_sampler_top_k_and_top_p():
    logits = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15], dtype=np.float32))
    ids, probs = Sampler(temperature=1.0, top_k=3).candidates(logits)
    assert ids.tolist() == [1, 3, 4]
    np.testing.assert_allclose(probs, np.array([0.4, 0.3, 0.15]) / 0.85, rtol=1e-6)
    # top_p = 0.75: 0.4 + 0.3 = 0.7 is not enough, 0.4 + 0.3 + 0.15 is.
    ids, probs = Sampler(temperature=1.0, top_p=0.75).candidates(logits)
    assert ids.tolist() == [1, 3, 4]
    ids, _ = Sampler(temperature=1.0, top_p=0.3).candidates(logits)
    assert ids.tolist() == [1]
    s = Sampler(temperature=1.0, top_k=2, seed=0)
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=5)
    assert counts[[0, 2, 4]].sum() == 0
    assert counts[1] / 4000 == pytest.approx(0.4 / 0.7, abs=0.03)
    # A high temperature flattens the distribution.
    _, hot = Sampler(temperature=100.0).candidates(logits)
    assert hot.max() - hot.min() < 0.02


# ---------------------------------------------------------------------- tokenizers
TEXT = "Wafer-scale: 850 000 cores, 48 KB each. Größe ≈ 46 225 mm² 🙂"


def test_byte_tokenizer_round_trip_and_streaming():
    tok = load_tokenizer(config=preset("tiny-llama"))
    assert isinstance(tok, ByteTokenizer) and tok.offset == 3
    ids = tok.encode(TEXT)
    assert ids[0] == 1 and max(ids) < 320 and min(ids[1:]) >= 3
    assert tok.decode(ids) == TEXT
    assert tok.encode("é", add_special_tokens=False) == [0xC3 + 3, 0xA9 + 3]
    stream = StreamDecoder(tok)
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) + stream.flush() == TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[-4:] == ["", "", "", "🙂"]  # four bytes, one character
    with pytest.raises(ValueError, match="too small"):
        ByteTokenizer(200)


def test_hf_tokenizer_json_round_trip():
    tok = load_tokenizer(FIXTURES / "tiny-llama-gqa")
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id == 1 and tok.eos_ids == (2,) and tok.vocab_size <= 157
    text = "the mesh passes each token to the cores at the edge"
    ids = tok.encode(text)
    assert ids[0] == 1 and max(ids) < 157
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=False) == ids[1:]
    stream = StreamDecoder(tok)
    assert "".join(stream.push(t) for t in ids) + stream.flush() == text
    # Without tokenizer.json the fallback needs 256 ids; this model has 151.
    with pytest.raises(ValueError, match="too small"):
        load_tokenizer(FIXTURES / "tiny-qwen2")

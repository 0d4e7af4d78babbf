"""Small GGUF files for the tests, written with ``gguf.GGUFWriter`` the way llama.cpp writes them.

A LLaMA-shaped model with random weights (HF names and layout kept here as the expectation), q/k
rows put in llama.cpp's rotary order, tensors quantized with ``gguf.quants`` into every supported
type, plus a byte-level BPE tokenizer of 256 byte tokens, three control tokens and a few merges.
"""

import numpy as np

from llm.modeling.config import ModelConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ c", "a t", "Ġc at", "1 2"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
#: HF tensor suffix -> GGUF type name, per layer parity (covers every supported type)
TYPES = {
    "self_attn.q_proj.weight": ("Q4_1", "Q8_0"),
    "self_attn.k_proj.weight": ("Q4_0", "F32"),
    "self_attn.v_proj.weight": ("Q8_0", "Q4_1"),
    "self_attn.o_proj.weight": ("F16", "BF16"),
    "mlp.gate_proj.weight": ("BF16", "Q4_0"),
    "mlp.up_proj.weight": ("Q4_1", "F16"),
    "mlp.down_proj.weight": ("F32", "Q4_0"),
}


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 byte values, in byte order."""
    keep = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def vocabulary() -> list[str]:
    """Specials (ids 0-2), the bytes (id 3 + byte), then one token per merge."""
    return SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]


def tiny_config(tied: bool = True, layers: int = 2) -> ModelConfig:
    return ModelConfig(
        family="llama",
        vocab_size=len(vocabulary()),
        hidden_size=64,
        intermediate_size=96,
        num_layers=layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=(2,),
        name="tiny-gguf",
    )


def llama_cpp_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter: per head, rows (first half, second half) -> interleaved pairs."""
    d = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        block = w[h * d : (h + 1) * d]
        out[h * d : (h + 1) * d : 2] = block[: d // 2]
        out[h * d + 1 : (h + 1) * d : 2] = block[d // 2 :]
    return out


def gguf_name(hf: str) -> str:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in names:
        return names[hf]
    parts = hf.split(".")
    short = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
    }
    key = parts[-2] if parts[-2] in short else parts[3]
    return f"blk.{parts[2]}.{short[key]}.{parts[-1]}"


def tensor_type(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "Q8_0"
    if hf == "lm_head.weight":
        return "F16"
    for suffix, kinds in TYPES.items():
        if hf.endswith(suffix):
            return kinds[int(hf.split(".")[2]) % 2]
    return "F32"


def write_tiny_gguf(
    path,
    config: ModelConfig | None = None,
    seed: int = 0,
    pre: str = "smollm",
    arch: str = "llama",
    override_type: dict | None = None,
    chat_template: str = CHAT_TEMPLATE,
) -> dict:
    """Write the tiny model; returns the HF weights as the file stores them, de-quantized
    (``gguf.quants`` round trip of the original tensors, original q/k row order)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    config = config or tiny_config()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(config.name)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(vocabulary())
    w.add_token_types([3] * len(SPECIALS) + [1] * (config.vocab_size - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(chat_template)
    stored = {}
    for name, shape in config.tensor_shapes().items():
        if name.endswith("norm.weight"):
            x = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            x = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        kind = (override_type or {}).get(name, tensor_type(name))
        qtype = getattr(Q, kind)
        stored[name] = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).reshape(shape)
        if ".q_proj." in name:
            x = llama_cpp_order(x, config.num_heads)
        elif ".k_proj." in name:
            x = llama_cpp_order(x, config.num_kv_heads)
        data = gguf.quants.quantize(x, qtype)
        w.add_tensor(gguf_name(name), data, raw_dtype=None if kind in ("F32", "F16") else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored

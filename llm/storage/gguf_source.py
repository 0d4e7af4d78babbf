"""GGUF files (llama.cpp's format) read as a model source: config, float32 weights, tokenizer.

A GGUF file holds key/value metadata and tensors. This reader uses the ``gguf`` package (the
``gguf`` extra; it parses the file with a memory map and de-quantizes in numpy) and maps the file
onto this project's own terms:

* **config** (:func:`gguf_config`) from ``general.architecture`` and the ``{arch}.*`` keys
  (``block_count``, ``embedding_length``, ``feed_forward_length``, ``attention.head_count[_kv]``,
  ``attention.key_length``, ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``,
  ``rope.scaling.*``, ``context_length``, ``vocab_size``) plus the special token ids of
  ``tokenizer.ggml.*``. Tied embeddings = no ``output.weight`` tensor.
* **weights** (:class:`GGUFWeights`): a lazy mapping from HF tensor names
  (``model.layers.3.self_attn.q_proj.weight``) to float32 arrays in torch layout ``[out, in]``.
  GGUF stores shapes fastest axis first (``ne0`` = in features), so a tensor of GGUF shape
  ``[in, out]`` is the row-major array ``[out, in]``. Block-quantized types are de-quantized
  along that fast axis, one block of 32 values at a time.
* **q/k rows**: llama.cpp's converter reorders the rows of ``attn_q`` and ``attn_k`` (and their
  biases) within each head from HF's rotate-half RoPE layout (first half, second half) to
  interleaved pairs (0, d/2, 1, d/2+1, ...); :func:`unpermute_rows` undoes it, as transformers
  does when it loads GGUF.

Supported: architecture ``llama`` (LLaMA 2/3-style, SmolLM, Mistral files written as llama) and
tensor types F32, F16, BF16, Q8_0, Q4_0, Q4_1. Anything else is one :class:`GGUFError` naming it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from ..modeling.config import ConfigError, ModelConfig
from ..modeling.weights import CheckpointError, check_weights

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

#: GGUF tensor name (per block ``blk.N.``) -> HF name (per layer ``model.layers.N.``)
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# tensors llama.cpp writes that carry nothing this model needs (precomputed RoPE tables)
_IGNORED = ("rope_freqs.weight",)


class GGUFError(CheckpointError):
    """A GGUF file this reader cannot use; the message names the key, tensor or type."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GGUFError(
            "reading GGUF files needs the gguf package: pip install "
            "'waferllm-mpi[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def is_gguf(path) -> bool:
    """True if ``path`` is a file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


def hf_name(gguf_name: str) -> str | None:
    """HF tensor name of a GGUF tensor name (``None`` if it is not a tensor of this model)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, interleaved pairs -> first half, second half.

    ``w`` is ``[heads * d, ...]`` (a weight ``[out, in]`` or a bias ``[out]``). Within each head,
    llama.cpp stores row ``2 j + i`` what HF stores at row ``i * d/2 + j`` (``i`` in {0, 1}).
    """
    d = w.shape[0] // heads
    return np.ascontiguousarray(
        w.reshape(heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order from HF's (the inverse of :func:`unpermute_rows`)."""
    d = w.shape[0] // heads
    return np.ascontiguousarray(
        w.reshape(heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


class GGUFFile:
    """An open GGUF file: metadata values by key, tensors by GGUF name.

    Parameters
    ----------
    path : path
        The ``.gguf`` file (memory-mapped; tensors are read when asked for).
    """

    def __init__(self, path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{path}: no such GGUF file")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise GGUFError(f"{path} is not a readable GGUF file ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def get(self, key: str, default=None):
        """Metadata value (int, float, bool, str, or list), or ``default`` if absent."""
        field = self.reader.get_field(key)
        if field is None:
            return default
        return field.contents()

    def require(self, key: str):
        value = self.get(key)
        if value is None:
            raise GGUFError(f"{self.path.name}: metadata key {key!r} is missing")
        return value

    def keys(self) -> list[str]:
        return list(self.reader.fields)

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """A tensor as float32 in row-major order (GGUF shape reversed)."""
        gguf = _gguf()
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{self.path.name}: tensor {name} is stored as {kind}; supported "
                f"types: {', '.join(SUPPORTED_TYPES)}"
            )
        shape = tuple(int(s) for s in reversed(t.shape))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


def _decimal(value) -> float:
    """A float32 metadata value as the decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return float(f"{float(value):.7g}")


def gguf_config(f: GGUFFile, max_context: int | None = None) -> ModelConfig:
    """The :class:`ModelConfig` a GGUF file describes (see the module docstring)."""
    arch = f.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{f.path.name}: architecture {arch!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if "rope_freqs.weight" in f.tensors:
        raise GGUFError(
            f"{f.path.name}: per-frequency RoPE factors (rope_freqs.weight, "
            "llama3-style scaling) are not supported from GGUF; convert the HF "
            "checkpoint instead"
        )

    def key(name, default=None):
        return f.get(f"{arch}.{name}", default)

    heads = int(f.require(f"{arch}.attention.head_count"))
    hidden = int(f.require(f"{arch}.embedding_length"))
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // heads
    if key("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(
            f"{f.path.name}: partial rotary embeddings (rope.dimension_count "
            f"{key('rope.dimension_count')} < head dim {head_dim}) are not supported"
        )
    tokens = f.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size") or (len(tokens) if tokens else None)
    if vocab is None:
        vocab = int(f.tensors["token_embd.weight"].shape[1])
    scaling = None
    kind = key("rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise GGUFError(f"{f.path.name}: rope scaling {kind!r} is not supported from GGUF")
        scaling = {"rope_type": "linear", "factor": float(key("rope.scaling.factor"))}
    eos = f.get("tokenizer.ggml.eos_token_id")
    extra_eos = f.get("tokenizer.ggml.eot_token_id")
    eos_ids = [int(e) for e in (eos, extra_eos) if e is not None]
    context = int(key("context_length", 2048))
    if max_context is not None:
        if not 0 < max_context <= context:
            raise ConfigError(f"max_context={max_context} must be in 1..{context}")
        context = int(max_context)
    try:
        return ModelConfig(
            family="llama",
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(f.require(f"{arch}.feed_forward_length")),
            num_layers=int(f.require(f"{arch}.block_count")),
            num_heads=heads,
            num_kv_heads=int(key("attention.head_count_kv", heads)),
            head_dim=int(head_dim),
            rms_norm_eps=_decimal(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_decimal(key("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=context,
            tie_word_embeddings="output.weight" not in f.tensors,
            attention_bias="blk.0.attn_q.bias" in f.tensors,
            attention_out_bias="blk.0.attn_output.bias" in f.tensors,
            mlp_bias="blk.0.ffn_gate.bias" in f.tensors,
            bos_token_id=f.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=tuple(dict.fromkeys(eos_ids)),
            dtype="float32",
            name=str(f.get("general.name") or f.path.stem),
        )
    except (ConfigError, NotImplementedError) as e:
        raise GGUFError(f"{f.path.name}: {e}") from None


class GGUFWeights(Mapping):
    """HF-named float32 weights of a GGUF file, de-quantized on access (nothing is kept).

    Parameters
    ----------
    f : GGUFFile
    config : ModelConfig
        From :func:`gguf_config`; its head counts undo the q/k row order. A config with fewer
        layers than the file exposes only those layers.
    """

    def __init__(self, f: GGUFFile, config: ModelConfig):
        self.file, self.config = f, config
        self._names = {}
        unknown = []
        for name in f.tensors:
            hf = hf_name(name)
            if hf is None:
                if name not in _IGNORED:
                    unknown.append(name)
                continue
            m = re.match(r"model\.layers\.(\d+)\.", hf)
            if m is None or int(m.group(1)) < config.num_layers:
                self._names[hf] = name
        if unknown:
            raise GGUFError(
                f"{f.path.name}: tensors this reader does not know: "
                f"{', '.join(unknown[:4])}{' ...' if len(unknown) > 4 else ''}"
            )
        bad = sorted({f.type_name(n) for n in self._names.values()} - set(SUPPORTED_TYPES))
        if bad:
            example = next(n for n in self._names.values() if f.type_name(n) in bad)
            raise GGUFError(
                f"{f.path.name}: tensor type {', '.join(bad)} (e.g. {example}) is "
                f"not supported; supported: {', '.join(SUPPORTED_TYPES)}"
            )

    def __getitem__(self, name: str) -> np.ndarray:
        w = self.file.tensor(self._names[name])
        if ".self_attn.q_proj." in name:
            w = unpermute_rows(w, self.config.num_heads)
        elif ".self_attn.k_proj." in name:
            w = unpermute_rows(w, self.config.num_kv_heads)
        return w

    def shapes(self) -> dict:
        return {
            hf: tuple(int(s) for s in reversed(self.file.tensors[g].shape))
            for hf, g in self._names.items()
        }

    def types(self) -> dict:
        """HF name -> GGUF tensor type name (``"Q4_1"``, ...)."""
        return {hf: self.file.type_name(g) for hf, g in self._names.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def load_gguf(path, max_context: int | None = None) -> tuple[ModelConfig, GGUFWeights, GGUFFile]:
    """``(config, lazy HF-named weights, the open file)`` of a GGUF file, checked against each
    other (every tensor the config needs is there, with its shape)."""
    f = GGUFFile(path)
    config = gguf_config(f, max_context)
    weights = GGUFWeights(f, config)
    try:
        check_weights(config, weights.shapes())
    except CheckpointError as e:
        raise GGUFError(f"{f.path.name}: {e}") from None
    return config, weights, f

"""Model configuration: a frozen dataclass mapped from HF ``config.json``, plus named presets.

Supported families (HF ``model_type``):

* ``llama``: LLaMA 2 / 3 / 3.1 (llama3 RoPE scaling), CodeLLaMA. ``attention_bias`` in HF puts a
  bias on q, k, v *and* o; ``mlp_bias`` on the three MLP projections.
* ``mistral``: LLaMA-style. A sliding window is accepted only when it covers the whole context.
* ``qwen2``: LLaMA-style with biases on q, k, v (never on o); often tied embeddings.

Both ``config.json`` layouts are read: transformers 4 (top-level ``rope_theta``, ``rope_scaling``,
``torch_dtype``) and transformers 5 (a ``rope_parameters`` dict, ``dtype``).

Adding a LLaMA-style family means adding one row to ``_FAMILIES`` (and its tensor names, if they
differ, to :meth:`ModelConfig.tensor_shapes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

#: Largest size accepted for each field: far beyond any published model, yet small enough that
#: a config claiming more (a typo, a crafted file) is refused before anything is sized by it.
MAX_SIZES = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_layers": 1 << 14,
    "num_heads": 1 << 14,
    "num_kv_heads": 1 << 14,
    "head_dim": 1 << 14,
    "max_position_embeddings": 1 << 30,
}


class ConfigError(ValueError):
    """A model configuration that is inconsistent or cannot be read; the message names the field."""


def _id_tuple(ids) -> tuple:
    """Token ids as HF configs write them (one int, a list, or null) as a tuple of int."""
    if ids is None:
        return ()
    items = [ids] if isinstance(ids, (int, float, str, bool)) else ids
    try:
        out = tuple(items)
    except TypeError:
        raise ConfigError(f"token ids must be integers, got {ids!r}") from None
    if not all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in out):
        raise ConfigError(f"token ids must be integers, got {ids!r}")
    return tuple(int(e) for e in out)


def _whole(d: dict, key: str, default=None):
    """``d[key]`` as an int: an integer, or a float with no fractional part (``ConfigError``
    for anything else: a fractional head count must not be rounded silently)."""
    value = d.get(key, default)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise ConfigError(f"{key} must be a whole number, got {value!r}")


def _flag(d: dict, key: str) -> bool:
    """``d[key]`` as a bool: ``true``/``false`` (null or absent: false). Text such as
    ``"false"`` is refused: read as a truth value it would silently mean true."""
    value = d.get(key)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ConfigError(f"{key} must be true or false, got {value!r}")


def _real(d: dict, key: str, default: float) -> float:
    """``d[key]`` as a finite float (``ConfigError`` for text, booleans, NaN or infinity)."""
    value = d.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _Family:
    """How one HF ``model_type`` maps onto :class:`ModelConfig`."""

    qkv_bias: bool | str  # fixed value, or the HF key that holds it
    out_bias: bool | str  # bias on o_proj
    mlp_bias: bool | str
    sliding_window: str | None  # how the window is stored: None, "plain" or "qwen2"
    default_theta: float
    default_max_pos: int
    default_bos: int | None
    default_eos: int | None


_FAMILIES = {
    "llama": _Family(
        qkv_bias="attention_bias",
        out_bias="attention_bias",
        mlp_bias="mlp_bias",
        sliding_window=None,
        default_theta=10000.0,
        default_max_pos=2048,
        default_bos=1,
        default_eos=2,
    ),
    "mistral": _Family(
        qkv_bias=False,
        out_bias=False,
        mlp_bias=False,
        sliding_window="plain",
        default_theta=10000.0,
        default_max_pos=4096 * 32,
        default_bos=1,
        default_eos=2,
    ),
    "qwen2": _Family(
        qkv_bias=True,
        out_bias=False,
        mlp_bias=False,
        sliding_window="qwen2",
        default_theta=10000.0,
        default_max_pos=32768,
        default_bos=None,
        default_eos=None,
    ),
}
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a LLaMA-style decoder.

    Attributes
    ----------
    family : str
        ``"llama"``, ``"mistral"`` or ``"qwen2"``.
    vocab_size, hidden_size, intermediate_size, num_layers : int
        Model sizes; the MLP is ``hidden -> intermediate -> hidden`` (SwiGLU).
    num_heads, num_kv_heads, head_dim : int
        Attention: ``num_heads`` query heads share ``num_kv_heads`` K/V heads (GQA); query head
        ``h`` reads K/V head ``h // (num_heads // num_kv_heads)``. ``num_heads * head_dim`` need
        not equal ``hidden_size``.
    rms_norm_eps : float
        Added inside the square root of RMSNorm.
    rope_theta : float
        RoPE base.
    rope_scaling : dict or None
        ``None`` for plain RoPE, else a normalised dict with ``rope_type`` ``"linear"``
        (``factor``) or ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
        ``original_max_position_embeddings``).
    max_position_embeddings : int
        The context length (positions ``0 .. max_position_embeddings - 1``).
    tie_word_embeddings : bool
        ``lm_head`` reuses ``embed_tokens`` (the checkpoint then has no ``lm_head.weight``).
    attention_bias : bool
        Biases on the q, k and v projections.
    attention_out_bias, mlp_bias : bool
        Biases on o_proj, and on gate/up/down (LLaMA's ``attention_bias``/``mlp_bias``).
    bos_token_id : int or None
    eos_token_id : tuple of int
        All end-of-sequence ids (HF allows an int or a list); empty if none.
    sliding_window : int or None
        Recorded for reference; always ``None`` or ``>= max_position_embeddings``, so attention is
        full causal attention.
    dtype : str
        Storage dtype of the checkpoint (``"bfloat16"``, ``"float16"``, ``"float32"``); compute is
        always float32.
    hidden_act : str
        Only ``"silu"`` is supported.
    name : str
        A label (preset name or source directory); not used by any computation.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple = field(default_factory=tuple)
    sliding_window: int | None = None
    dtype: str = "float32"
    hidden_act: str = "silu"
    name: str = ""

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        if self.family not in _FAMILIES:
            raise ConfigError(
                f"family {self.family!r} is not supported; "
                f"supported: {', '.join(sorted(_FAMILIES))}"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
            if value > MAX_SIZES[key]:
                raise ConfigError(
                    f"{key}={value} is beyond any real model (at most {MAX_SIZES[key]} is "
                    "accepted); is the config damaged?"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_kv_heads={self.num_kv_heads} does not divide "
                f"num_heads={self.num_heads} (GQA needs whole groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even (RoPE rotates pairs)")
        for key in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key} must be a number, got {value!r}")
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a positive finite number, got {value!r}")
        if self.hidden_act != "silu":
            raise NotImplementedError(
                f"hidden_act {self.hidden_act!r} is not supported (only silu)"
            )
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            raise NotImplementedError(
                f"sliding-window attention (window {self.sliding_window} < context "
                f"{self.max_position_embeddings}) is not implemented; it equals full attention "
                f"only for sequences within the window: pass max_context<={self.sliding_window} "
                "to ModelConfig.from_hf_dict / from_json to run with such a context"
            )
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", _check_rope_scaling(dict(self.rope_scaling)))
        eos = _id_tuple(self.eos_token_id)
        object.__setattr__(self, "eos_token_id", eos)
        if self.bos_token_id is not None:
            (bos,) = _id_tuple(self.bos_token_id)
            object.__setattr__(self, "bos_token_id", bos)
        for tok in eos + ((self.bos_token_id,) if self.bos_token_id is not None else ()):
            if not 0 <= tok < self.vocab_size:
                raise ConfigError(
                    f"special token id {tok} is outside the vocabulary "
                    f"(vocab_size={self.vocab_size})"
                )

    def __hash__(self):
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # ------------------------------------------------------------------ derived sizes
    @property
    def group_size(self) -> int:
        """Query heads per K/V head (``num_heads // num_kv_heads``)."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        """Output features of q_proj (``num_heads * head_dim``)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Output features of k_proj and v_proj (``num_kv_heads * head_dim``)."""
        return self.num_kv_heads * self.head_dim

    @property
    def eos_ids(self) -> tuple:
        """All end-of-sequence token ids (possibly empty)."""
        return self.eos_token_id

    def tensor_shapes(self) -> dict:
        """HF tensor name -> shape of every weight the checkpoint must hold, in HF order.

        Linear weights are torch layout ``[out, in]``. ``lm_head.weight`` is absent when the
        embeddings are tied.
        """
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_size, self.kv_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h)}
        for layer in range(self.num_layers):
            p = f"model.layers.{layer}."
            shapes[p + "input_layernorm.weight"] = (h,)
            for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"self_attn.{proj}.weight"] = (out, h)
                if self.attention_bias:
                    shapes[p + f"self_attn.{proj}.bias"] = (out,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            if self.attention_out_bias:
                shapes[p + "self_attn.o_proj.bias"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
            for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
                shapes[p + f"mlp.{proj}.weight"] = shape
                if self.mlp_bias:
                    shapes[p + f"mlp.{proj}.bias"] = shape[:1]
        shapes["model.norm.weight"] = (h,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        return shapes

    def num_parameters(self) -> int:
        """Number of stored parameters (tied embeddings counted once)."""
        total = 0
        for shape in self.tensor_shapes().values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field (for shard manifests); see :meth:`from_dict`."""
        d = dataclasses.asdict(self)
        d["eos_token_id"] = list(self.eos_token_id)
        d["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Rebuild a config written by :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields {unknown}")
        return cls(**d)

    @classmethod
    def from_hf_dict(cls, d: dict, max_context: int | None = None, name: str = "") -> ModelConfig:
        """Map an HF ``config.json`` dict (transformers 4 or 5 layout) onto a config.

        Parameters
        ----------
        d : dict
            The parsed ``config.json``.
        max_context : int, optional
            Use a shorter context than ``max_position_embeddings``; this is also how a model with a
            sliding window shorter than its context is accepted (the window then covers it all).
        name : str
            Label stored in :attr:`name`.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a JSON object, not a {type(d).__name__}")
        archs = d.get("architectures")
        archs = archs if isinstance(archs, list) else ()
        family = d.get("model_type") or next(
            (_ARCHITECTURES[a] for a in archs if isinstance(a, str) and a in _ARCHITECTURES), None
        )
        if not isinstance(family, (str, type(None))):
            raise ConfigError(f"model_type must be a name, got {family!r}")
        if family not in _FAMILIES:
            raise ConfigError(
                f"model_type {family!r} is not supported; supported: {', '.join(sorted(_FAMILIES))}"
            )
        fam = _FAMILIES[family]
        missing = [
            k
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
            )
            if d.get(k) is None
        ]
        if missing:
            raise ConfigError(f"config.json lacks required keys {missing}")
        heads, hidden = _whole(d, "num_attention_heads"), _whole(d, "hidden_size")
        kv_heads = _whole(d, "num_key_value_heads")  # null or absent: as many as query heads
        head_dim = _whole(d, "head_dim")
        if head_dim is None:
            if heads <= 0 or hidden % heads:
                raise ConfigError(
                    f"hidden_size={hidden} is not divisible by "
                    f"num_attention_heads={heads} and no head_dim is given"
                )
            head_dim = hidden // heads
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise NotImplementedError("partial_rotary_factor != 1 is not supported")

        max_pos = _whole(d, "max_position_embeddings")
        if max_pos is None:
            max_pos = fam.default_max_pos
        elif max_pos <= 0:
            raise ConfigError(f"max_position_embeddings must be positive, got {max_pos}")
        theta, scaling = _parse_rope(d, fam.default_theta, max_pos)
        if max_context is not None:
            if not 0 < max_context <= max_pos:
                raise ConfigError(f"max_context={max_context} must be in 1..{max_pos}")
            max_pos = int(max_context)

        window = None
        if fam.sliding_window == "plain" or (
            fam.sliding_window == "qwen2" and _flag(d, "use_sliding_window")
        ):
            window = _whole(d, "sliding_window")

        def flag(spec):
            return _flag(d, spec) if isinstance(spec, str) else spec

        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        if not isinstance(dtype, str):
            raise ConfigError(f"dtype must be a name such as bfloat16, got {dtype!r}")
        dtype = dtype.replace("torch.", "")
        return cls(
            family=family,
            vocab_size=_whole(d, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_whole(d, "intermediate_size"),
            num_layers=_whole(d, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=heads if kv_heads is None else kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_real(d, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=_flag(d, "tie_word_embeddings"),
            attention_bias=flag(fam.qkv_bias),
            attention_out_bias=flag(fam.out_bias),
            mlp_bias=flag(fam.mlp_bias),
            bos_token_id=d.get("bos_token_id", fam.default_bos),
            eos_token_id=_id_tuple(d.get("eos_token_id", fam.default_eos)),
            sliding_window=window,
            dtype=dtype,
            hidden_act=d.get("hidden_act", "silu"),
            name=name,
        )

    @classmethod
    def from_json(cls, path, max_context: int | None = None) -> ModelConfig:
        """Read an HF ``config.json`` (or a model directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} must hold a JSON object, not a {type(d).__name__}")
        return cls.from_hf_dict(d, max_context=max_context, name=path.parent.name)

    def to_hf_dict(self) -> dict:
        """An HF ``config.json`` dict (transformers 4 layout, which transformers 5 also reads)."""
        archs = {v: k for k, v in _ARCHITECTURES.items()}
        d = {
            "architectures": [archs[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else dict(self.rope_scaling),
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                self.eos_token_id[0]
                if len(self.eos_token_id) == 1
                else list(self.eos_token_id) or None
            ),
            "torch_dtype": self.dtype,
        }
        if self.family == "llama":
            if self.attention_bias != self.attention_out_bias:
                raise ConfigError("HF llama has one attention_bias flag for q/k/v and o together")
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.family == "mistral":
            d["sliding_window"] = self.sliding_window
        else:
            d.update(
                use_sliding_window=self.sliding_window is not None,
                sliding_window=self.sliding_window,
            )
        return d


def _parse_rope(d: dict, default_theta: float, max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, normalised rope_scaling) from either config layout."""
    params = d.get("rope_parameters")
    legacy = d.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", legacy)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{key} must be a JSON object, got {value!r}")
    if (
        isinstance(params, dict)
        and params
        and all(isinstance(v, dict) or v is None for v in params.values())
    ):
        # Nested per layer type ({"full_attention": {...}, ...}): fine only if all are the same.
        distinct = {json.dumps(v, sort_keys=True) for v in params.values() if v is not None}
        if len(distinct) > 1:
            raise NotImplementedError("different RoPE parameters per layer type are not supported")
        params = json.loads(distinct.pop()) if distinct else {}
    params = dict(params or {})
    if legacy:
        for key, value in legacy.items():
            params.setdefault(key, value)
    theta = params.get("rope_theta", d.get("rope_theta"))
    theta = _real({"rope_theta": theta}, "rope_theta", default_theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", max_pos)
    return theta, scaling


def _check_rope_scaling(s: dict) -> dict:
    """Validate a rope_scaling dict and keep only the keys that matter, as floats/ints."""
    rope_type = s.get("rope_type", s.get("type"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise NotImplementedError(
            f"rope type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    keys = {
        "default": (),
        "linear": ("factor",),
        "llama3": (
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ),
    }[rope_type]
    missing = [k for k in keys if s.get(k) is None]
    if missing:
        raise ConfigError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    out = {"rope_type": rope_type}
    for k in keys:
        try:
            value = _whole(s, k) if k == "original_max_position_embeddings" else _real(s, k, 0.0)
        except ConfigError as e:
            raise ConfigError(f"rope_scaling {e}") from None
        if not value > 0:
            raise ConfigError(f"rope_scaling {k} must be positive, got {value!r}")
        out[k] = value
    if rope_type == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
    return out


# ---------------------------------------------------------------------- presets
def _llama3_scaling(factor=8.0, low=1.0, high=4.0, original=8192):
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


PRESETS = {
    # Meta-Llama-3.1-8B shapes (LLaMA3-8B with the 3.1 long-context RoPE scaling).
    "llama3-8b": dict(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_llama3_scaling(),
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001,),
        dtype="bfloat16",
    ),
    "llama2-13b": dict(
        family="llama",
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=(2,),
        dtype="float16",
    ),
    "codellama-34b": dict(
        family="llama",
        vocab_size=32000,
        hidden_size=8192,
        intermediate_size=22016,
        num_layers=48,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        max_position_embeddings=16384,
        bos_token_id=1,
        eos_token_id=(2,),
        dtype="bfloat16",
    ),
    "qwen2-72b": dict(
        family="qwen2",
        vocab_size=152064,
        hidden_size=8192,
        intermediate_size=29568,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        attention_bias=True,
        bos_token_id=151643,
        eos_token_id=(151643,),
        dtype="bfloat16",
    ),
    # About 103 M parameters: small enough for a laptop, LLaMA-3-like in every other respect.
    "llama-100m": dict(
        family="llama",
        vocab_size=32000,
        hidden_size=640,
        intermediate_size=1792,
        num_layers=14,
        num_heads=10,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=(2,),
    ),
    # A toy for tests and demos; its vocabulary fits the byte-level fallback tokenizer.
    "tiny-llama": dict(
        family="llama",
        vocab_size=320,
        hidden_size=64,
        intermediate_size=176,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=(2,),
    ),
}


def preset(name: str, layers: int | None = None) -> ModelConfig:
    """A named configuration with real model shapes; ``layers`` overrides the layer count.

    Names: ``llama3-8b``, ``llama2-13b``, ``codellama-34b``, ``qwen2-72b``, ``llama-100m``,
    ``tiny-llama``.
    """
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    kwargs = dict(PRESETS[key], name=key)
    if kwargs.get("rope_scaling") is not None:
        kwargs["rope_scaling"] = dict(kwargs["rope_scaling"])
    if layers is not None:
        kwargs["num_layers"] = layers
    return ModelConfig(**kwargs)

"""Rotary position embeddings, with the numerics of HF transformers.

Everything is float32, like HF: the inverse frequencies, the angles ``position * inv_freq`` and
their cosines. The layout is HF's *half split* ("rotate_half"): feature ``j`` of a head is paired
with feature ``j + head_dim/2`` and both rotate by the angle of frequency ``j``.
Supported scalings: none (``"default"``), ``"linear"`` and ``"llama3"`` (LLaMA 3.1).
"""

from __future__ import annotations

import math

import numpy as np


def inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
    """Inverse frequencies of one head.

    Parameters
    ----------
    head_dim : int
        Even head size ``D``.
    theta : float
        RoPE base.
    scaling : dict or None
        A normalised ``ModelConfig.rope_scaling`` dict.

    Returns
    -------
    f32[D/2]
        ``theta ** (-2j / D)`` for ``j = 0 .. D/2 - 1``, then scaled.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    # HF raises the float32 base to float32 exponents. numpy's vectorised float32 power rounds
    # differently from torch's in ~17% of cases; a float64 power rounded once to float32 agrees
    # with torch in ~99% of cases (the rest differ by 1 ulp) and is the more accurate value.
    power = np.float64(np.float32(theta)) ** exponents.astype(np.float64)
    freq = np.float32(1.0) / power.astype(np.float32)  # f32[D/2]
    if scaling is None:
        return freq
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return freq
    if rope_type == "linear":
        return (freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        return _llama3(freq, scaling)
    raise NotImplementedError(f"rope type {rope_type!r} is not supported")


def _llama3(freq: np.ndarray, s: dict) -> np.ndarray:
    """LLaMA 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp
    in between. All arithmetic in float32, as HF does it."""
    f32 = np.float32
    factor, low = f32(s["factor"]), f32(s["low_freq_factor"])
    span = f32(s["high_freq_factor"] - s["low_freq_factor"])
    old_len = f32(s["original_max_position_embeddings"])
    low_wavelen = f32(s["original_max_position_embeddings"] / s["low_freq_factor"])
    high_wavelen = f32(s["original_max_position_embeddings"] / s["high_freq_factor"])
    wavelen = f32(2 * math.pi) / freq  # f32[D/2]
    slowed = np.where(wavelen > low_wavelen, freq / factor, freq)
    ramp = (old_len / wavelen - low) / span  # 0 at low, 1 at high
    smoothed = (f32(1) - ramp) * slowed / factor + ramp * slowed
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, slowed).astype(np.float32)


def inv_freq_for(config) -> np.ndarray:
    """:func:`inv_freq` of a :class:`~llm.modeling.config.ModelConfig`; f32[head_dim/2]."""
    return inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)


def cos_sin(freq: np.ndarray, positions) -> tuple[np.ndarray, np.ndarray]:
    """Cosine and sine tables for absolute positions.

    Parameters
    ----------
    freq : f32[D/2]
        From :func:`inv_freq`.
    positions : int[T]
        Absolute positions (``start + t`` with a KV cache).

    Returns
    -------
    cos, sin : f32[T, D]
        The angle of frequency ``j`` sits at columns ``j`` and ``j + D/2``.
    """
    pos = np.asarray(positions, dtype=np.float32)
    angles = pos[:, None] * freq[None, :]  # f32[T, D/2]
    angles = np.concatenate([angles, angles], axis=-1)  # f32[T, D]
    return np.cos(angles), np.sin(angles)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate queries or keys.

    Parameters
    ----------
    x : f32[T, H, D]
        One row per position, any number of heads.
    cos, sin : f32[T, D]
        From :func:`cos_sin` for the same positions.

    Returns
    -------
    f32[T, H, D]
        ``x * cos + rotate_half(x) * sin``, i.e. :func:`llm.modeling.functional.rope_half`.
    """
    from .functional import rope_half

    return rope_half(x, cos, sin)

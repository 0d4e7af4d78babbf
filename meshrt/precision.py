"""Storage precisions: float32, float16 and bfloat16-style, with float32 arithmetic throughout.

numpy has no bfloat16 type, so bfloat16 is kept two ways: as raw 16-bit words (``uint16``, for
files: half the bytes) or as float32 values rounded to bfloat16 precision (for the emulated
wafer: the numbers a bfloat16 core would hold, in a container numpy can multiply). Rounding is to
nearest, ties to even; NaN stays NaN.
"""
from __future__ import annotations

import numpy as np

STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def bf16_words(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 words (``uint16``), rounded to nearest even."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    words = (rounded >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), words)


def from_bf16_words(words: np.ndarray) -> np.ndarray:
    """bfloat16 words (``uint16``) -> float32, exactly."""
    return (np.asarray(words, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 precision (still float32)."""
    return from_bf16_words(bf16_words(x))


def as_storage(x: np.ndarray, dtype) -> np.ndarray:
    """``x`` as a core would store it: ``float32``, ``float16``, or ``"bfloat16"`` (rounded
    values in float32)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return round_to_bf16(x)
    return np.asarray(x).astype(dtype, copy=False)

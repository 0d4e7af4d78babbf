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
    r = bits >> np.uint32(16)  # in place from here: few passes, one temporary
    r &= np.uint32(1)
    r += np.uint32(0x7FFF)
    r += bits
    r >>= np.uint32(16)
    words = r.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        words[nan] = np.uint16(0x7FC0)
    return words


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


# ---------------------------------------------------------------------- 16-bit weights in memory
# Weights are held the way the wafer holds them: in their 16-bit storage words. A ``uint16``
# array is bfloat16 words (numpy has no bfloat16 type), a ``float16`` array is IEEE half; kernels
# widen them to float32 a piece at a time (:func:`widen`) and accumulate in float32.


def word_dtype(storage: str) -> np.dtype:
    """The numpy dtype that holds ``storage`` words: float32, float16, or uint16 for bfloat16."""
    if storage == "bfloat16":
        return np.dtype(np.uint16)
    if storage in ("float32", "float16"):
        return np.dtype(storage)
    raise ValueError(f"storage dtype {storage!r} must be one of {', '.join(STORAGE_DTYPES)}")


def to_words(x: np.ndarray, storage: str) -> np.ndarray:
    """float32 values as ``storage`` words (:func:`word_dtype`); bfloat16 rounds to nearest even."""
    if storage == "bfloat16":
        return bf16_words(x)
    return np.asarray(x).astype(word_dtype(storage), copy=False)


def is_words(x: np.ndarray) -> bool:
    """True for arrays of 16-bit storage words that must be widened before arithmetic."""
    return x.dtype == np.uint16 or x.dtype == np.float16


def widen(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Storage words (or float32) as float32 values, exactly; into ``out`` when given.

    float32 input is returned as is (``out`` unused). bfloat16 words widen with one shift.
    """
    if x.dtype == np.float32:
        return x
    if out is None:
        out = np.empty(x.shape, np.float32)
    if x.dtype == np.uint16:
        np.left_shift(x, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, x, casting="same_kind")
    return out

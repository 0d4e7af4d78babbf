"""The pointwise maths of a LLaMA layer, shared by the reference model and the mesh engines.

Everything here is elementwise (or along one axis the caller chooses), so the same function
serves the dense reference (whole vectors) and every core of the mesh (its segments, after the
reductions the engine performs over the fabric). All float32, with HF transformers' numerics.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def silu(x: np.ndarray) -> np.ndarray:
    """``x * sigmoid(x)``, written with tanh so large ``|x|`` cannot overflow."""
    return x * (F32(0.5) * (F32(1.0) + np.tanh(F32(0.5) * x)))


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The LLaMA MLP's gated activation ``silu(gate) * up``."""
    return silu(gate) * up


def rms_inverse(mean_square: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm's scale ``1 / sqrt(mean(x^2) + eps)`` from the mean square (float32)."""
    return F32(1.0) / np.sqrt(mean_square + F32(eps))


def rms_scale(x: np.ndarray, inverse: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``x * inverse * weight`` (the scale broadcast over ``x``'s feature axis by the caller)."""
    return x * inverse * weight


def rotate(first: np.ndarray, second: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> tuple:
    """RoPE on feature pairs: ``(a cos - b sin, b cos + a sin)``.

    HF's half split pairs feature ``j`` with ``j + D/2``; the mesh layout pairs adjacent
    features. Either way the pair's two members and its angle's cosine and sine go in here.
    """
    return first * cos - second * sin, second * cos + first * sin


def rope_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent feature pairs ``(2i, 2i+1)`` along axis ``-2`` of ``x[..., F, G]``.

    ``cos``, ``sin`` are ``[..., F]`` (the two features of a pair share their angle).
    """
    pairs = x.reshape(x.shape[:-2] + (x.shape[-2] // 2, 2, x.shape[-1]))
    c = cos.reshape(cos.shape[:-1] + (cos.shape[-1] // 2, 2))[..., 0, None]
    s = sin.reshape(sin.shape[:-1] + (sin.shape[-1] // 2, 2))[..., 0, None]
    even, odd = rotate(pairs[..., 0, :], pairs[..., 1, :], c, s)
    return np.stack([even, odd], axis=-2).reshape(x.shape)


def rope_plan(tk: int, g: int) -> tuple:
    """Index arrays that rotate a core's ``q | k`` features (``tk * g`` query features, the
    ``g`` heads of K/V feature ``j`` at ``j * g + h``, then ``tk`` key features) in one pass.

    Adjacent K/V features ``(2i, 2i+1)`` form a RoPE pair with the angle of feature ``2i``
    (:func:`rope_pairs`). Returns ``(angle, partner, sign)``, each of
    length ``tk * g + tk``, per feature: the K/V feature whose angle it takes, the feature it
    pairs with, and the sign of the sine term (``-1`` on the first of a pair), so that
    ``x * cos[angle] + x[partner] * (sign * sin[angle])`` is :func:`rotate` of every pair, product
    for product (``a c + b (-s)`` is ``a c - b s`` exactly).
    """
    j = np.concatenate([np.repeat(np.arange(tk), g), np.arange(tk)])  # K/V feature of each
    h = np.concatenate([np.tile(np.arange(g), tk), np.zeros(tk, np.int64)])  # its head
    first = j % 2 == 0
    angle = j - j % 2
    partner = np.concatenate([(j[: tk * g] ^ 1) * g + h[: tk * g], tk * g + (j[tk * g :] ^ 1)])
    sign = np.where(first, np.float32(-1), np.float32(1)).astype(np.float32)
    return angle, partner, sign


def rope_half(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate HF's half-split pairs ``(j, j + D/2)`` of ``x[T, H, D]``; cos, sin ``[T, D]``."""
    half = x.shape[-1] // 2
    c, s = cos[:, None, :half], sin[:, None, :half]
    first, second = rotate(x[..., :half], x[..., half:], c, s)
    return np.concatenate([first, second], axis=-1)


def softmax_numerator(scores: np.ndarray, row_max: np.ndarray, valid=None) -> np.ndarray:
    """``exp(scores - max)``, 0 where ``valid`` is False (masked keys)."""
    e = np.exp(scores - row_max)
    return e if valid is None else np.where(valid, e, F32(0)).astype(F32, copy=False)


def softmax_normalize(numerator: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Probabilities from the numerators and their sum over the keys."""
    return numerator / total


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis in float32; ``-inf`` entries get probability 0."""
    e = softmax_numerator(x, np.max(x, axis=-1, keepdims=True))
    return softmax_normalize(e, np.sum(e, axis=-1, keepdims=True))

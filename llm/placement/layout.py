"""Where every feature of a model sits on a virtual mesh: padding and permutations.

Two permutations make attention local to each core without replicating K/V per query head:

1. **RoPE pairs adjacent.** HF rotates feature ``j`` of a head with feature ``j + D/2``. Inside
   every head the features are reordered ``[0, D/2, 1, D/2+1, ...]``, so each pair sits in two
   adjacent features (an even segment boundary never splits a pair).
2. **Query heads grouped by their K/V feature.** With ``G`` query heads per K/V head, query
   feature ``kv_feature * G + g`` is feature ``kv_feature`` (in the order above) of query head
   ``kv_head * G + g``. The x-segment of q on a core is then exactly ``G`` times the x-segment of
   K/V on that core, feature by feature: partial scores of all heads form locally.

Dot products are invariant when both sides are permuted alike, so the model's numbers do not
change. Every feature dimension is zero-padded to a multiple of ``lcm(Py, Px)`` (K/V features to
twice that, keeping pairs whole), so padding never changes a result: padded weights are zero.

The permutations are recorded in shard manifests (:meth:`PhaseLayout.describe`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from meshrt.mesh import lcm, padded

from ..modeling.config import ModelConfig
from ..modeling.rope import inv_freq_for

LAYOUT_VERSION = 1


def mesh_pair(values: Iterable[int]) -> tuple[int, int]:
    """``(rows, cols)`` of a virtual mesh or rank grid given as any two-element sequence (a
    list read from JSON, a tuple, a ``MeshSpec`` field).

    Raises
    ------
    ValueError
        Unless there are exactly two values.
    """
    rows, cols = values
    return rows, cols


@dataclass(frozen=True)
class PhaseLayout:
    """Feature placement of ``config`` on a ``py x px`` virtual mesh (one phase).

    Attributes (padded sizes)
    -------------------------
    hidden, ffn, vocab : int
        Hidden, MLP and vocabulary sizes padded to a multiple of ``lcm(py, px)``.
    kv : int
        K/V features (``num_kv_heads * head_dim``) padded to a multiple of ``2 lcm(py, px)``.
    q : int
        Query features, ``G * kv``.
    """

    config: ModelConfig
    py: int
    px: int

    @property
    def unit(self) -> int:
        return lcm(self.py, self.px)

    @property
    def hidden(self) -> int:
        return padded(self.config.hidden_size, self.unit)

    @property
    def ffn(self) -> int:
        return padded(self.config.intermediate_size, self.unit)

    @property
    def vocab(self) -> int:
        return padded(self.config.vocab_size, self.unit)

    @property
    def kv(self) -> int:
        return padded(self.config.kv_size, self.unit, multiple=2)

    @property
    def q(self) -> int:
        return self.config.group_size * self.kv

    # -- permutations ----------------------------------------------------------------------
    @cached_property
    def kv_perm(self) -> np.ndarray:
        """``int[kv]``: HF k/v feature index of each mesh K/V feature, ``-1`` for padding."""
        c = self.config
        d = c.head_dim
        within = np.empty(d, dtype=np.int64)
        within[0::2] = np.arange(d // 2)
        within[1::2] = np.arange(d // 2) + d // 2
        perm = (np.arange(c.num_kv_heads)[:, None] * d + within[None, :]).ravel()
        return np.concatenate([perm, np.full(self.kv - perm.size, -1, dtype=np.int64)])

    @cached_property
    def q_perm(self) -> np.ndarray:
        """``int[q]``: HF q feature index of each mesh query feature (``kv_feature * G + g``)."""
        c = self.config
        g = c.group_size
        d = c.head_dim
        kvp = self.kv_perm
        out = np.full((self.kv, g), -1, dtype=np.int64)
        real = kvp >= 0
        kv_head, within = kvp[real] // d, kvp[real] % d
        for j in range(g):  # query head kv_head * G + j reads K/V head kv_head
            out[real, j] = (kv_head * g + j) * d + within
        return out.ravel()

    @cached_property
    def kv_head(self) -> np.ndarray:
        """``int[kv]``: K/V head of each mesh K/V feature, ``-1`` for padding."""
        kvp = self.kv_perm
        return np.where(kvp >= 0, kvp // self.config.head_dim, -1)

    @cached_property
    def rope_freq(self) -> np.ndarray:
        """``f32[kv]``: RoPE inverse frequency of each mesh K/V feature (0 for padding); the two
        features of a pair share it."""
        kvp = self.kv_perm
        freq = inv_freq_for(self.config)  # f32[D/2]
        within = kvp % self.config.head_dim
        pair = np.where(
            within < self.config.head_dim // 2, within, within - self.config.head_dim // 2
        )
        return np.where(kvp >= 0, freq[pair], 0).astype(np.float32)

    def head_onehot(self) -> np.ndarray:
        """``f32[kv, num_kv_heads]``: 1 where a mesh K/V feature belongs to a K/V head."""
        out = np.zeros((self.kv, self.config.num_kv_heads), dtype=np.float32)
        real = self.kv_head >= 0
        out[np.flatnonzero(real), self.kv_head[real]] = 1
        return out

    # -- weight matrices in mesh order (math layout ``[in, out]``) ----------------------------
    @staticmethod
    def take(a: np.ndarray, perm: np.ndarray, axis: int, size: int | None = None) -> np.ndarray:
        """``a`` indexed by ``perm`` along ``axis`` (``-1`` gives zeros), padded to ``size``."""
        a = np.asarray(a, dtype=np.float32)
        if perm is None:
            perm = np.arange(a.shape[axis])
        if size is not None and size > perm.size:
            perm = np.concatenate([perm, np.full(size - perm.size, -1, dtype=np.int64)])
        out = np.take(a, np.where(perm >= 0, perm, 0), axis=axis)
        mask_shape = [1] * a.ndim
        mask_shape[axis] = perm.size
        return out * (perm >= 0).reshape(mask_shape).astype(np.float32)

    def linear(
        self, weight: np.ndarray, out_perm=None, out_size=None, in_perm=None, in_size=None
    ) -> np.ndarray:
        """HF ``[out, in]`` weight -> mesh ``W[in, out]`` with permuted, padded features."""
        w = np.asarray(weight, dtype=np.float32).T
        w = self.take(w, in_perm if in_perm is not None else np.arange(w.shape[0]), 0, in_size)
        return self.take(
            w, out_perm if out_perm is not None else np.arange(w.shape[1]), 1, out_size
        )

    def describe(self) -> dict:
        """JSON-able record of the placement (for manifests)."""
        return {
            "mesh": [self.py, self.px],
            "hidden": self.hidden,
            "ffn": self.ffn,
            "vocab": self.vocab,
            "kv": self.kv,
            "q": self.q,
            "rope_layout": "pairs-adjacent (HF half-split reordered [0, D/2, 1, D/2+1, ...])",
            "q_order": "kv_feature * group_size + g (query head = kv_head * group_size + g)",
            "padding": f"zeros to multiples of lcm(py, px) = {self.unit} (kv: {2 * self.unit})",
        }

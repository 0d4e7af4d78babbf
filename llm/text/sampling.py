"""Choosing the next token from logits: greedy, or temperature with top-k / top-p filtering.

The order is HF's: divide by the temperature, keep the ``top_k`` largest logits, then keep the
smallest set of most likely tokens whose probability reaches ``top_p``, renormalise, draw. Ties
are broken towards the lower token id everywhere, so a seeded sampler is fully deterministic.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    """Pick a token id from a logits vector.

    Parameters
    ----------
    temperature : float
        0 means greedy (argmax, lowest id on ties); otherwise logits are divided by it.
    top_k : int
        Keep only the ``top_k`` most likely tokens (0 = no limit).
    top_p : float
        Nucleus sampling: keep the most likely tokens until their probability reaches ``top_p``
        (1.0 = no limit). At least one token is always kept.
    seed : int, optional
        Seed of the random stream; the same seed and the same logits give the same tokens.
    """

    def __init__(
        self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None
    ):
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        if int(top_k) != top_k or top_k < 0:
            raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        self.temperature, self.top_k, self.top_p, self.seed = (
            float(temperature),
            int(top_k),
            float(top_p),
            seed,
        )
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        """True when the sampler always takes the argmax."""
        return self.temperature == 0

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens that may be drawn and their probabilities.

        Parameters
        ----------
        logits : f32[vocab]

        Returns
        -------
        ids : int64[K]
            Most likely first (lower id first among equal logits).
        probs : f64[K]
            Renormalised probabilities of ``ids``; they sum to 1.

        Raises
        ------
        FloatingPointError
            If the logits hold NaN or the largest one is infinite.
        """
        x = np.asarray(logits, dtype=np.float64).reshape(-1)
        if np.isnan(x).any():
            raise FloatingPointError("non-finite logits: NaN in the sampler's input")
        if self.greedy:
            return np.array([int(np.argmax(x))]), np.ones(1)
        order = np.argsort(-x, kind="stable")  # int64[vocab], best first
        if self.top_k:
            order = order[: self.top_k]
        z = x[order] / self.temperature
        if not np.isfinite(z[0]):
            raise FloatingPointError("non-finite logits: the largest logit is infinite")
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        if self.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1
            order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
        nonzero = probs > 0
        return order[nonzero], probs[nonzero]

    def __call__(self, logits: np.ndarray) -> int:
        """Choose one token id from ``logits`` f32[vocab]."""
        ids, probs = self.candidates(logits)
        if ids.size == 1:
            return int(ids[0])
        cdf = np.cumsum(probs)
        i = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(i, ids.size - 1)])

    def __repr__(self) -> str:
        return (
            f"Sampler(temperature={self.temperature}, top_k={self.top_k}, "
            f"top_p={self.top_p}, seed={self.seed})"
        )

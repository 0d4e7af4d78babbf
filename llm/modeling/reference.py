"""The dense single-process reference model: the oracle the mesh model must match.

A plain numpy LLaMA-style decoder in float32, with the numerics of HF transformers:

* RMSNorm: ``x / sqrt(mean(x**2) + eps) * weight``, computed in float32;
* attention: q/k/v projections (+ bias for Qwen2), RoPE at absolute positions, scores
  ``q k^T / sqrt(head_dim)``, causal mask, float32 softmax; query head ``h`` reads K/V head
  ``h // group_size`` (GQA);
* MLP: ``down(silu(gate(x)) * up(x))``; pre-norm residual blocks; final norm; ``lm_head``.

Linear weights are HF/torch layout ``[out, in]``, so a projection is ``x @ W.T``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from . import functional as F
from . import rope
from .config import ModelConfig
from .weights import check_weights, lm_head_weight


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x f32[..., H], weight f32[H] -> f32[..., H]."""
    return F.rms_scale(x, F.rms_inverse(np.mean(x * x, axis=-1, keepdims=True), eps), weight)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal grouped-query attention of T new queries over all S cached positions.

    Parameters
    ----------
    q : f32[T, n_heads, D]
        Queries at absolute positions ``start .. start + T - 1`` (RoPE applied).
    k, v : f32[S, n_kv, D]
        Keys (RoPE applied) and values at positions ``0 .. S - 1``, ``S = start + T``.
    start : int
        Absolute position of the first query.

    Returns
    -------
    f32[T, n_heads * D]
        Heads concatenated in order, ready for o_proj.
    """
    t, n_heads, d = q.shape
    s, n_kv, _ = k.shape
    g = n_heads // n_kv
    qg = q.reshape(t, n_kv, g, d).transpose(1, 2, 0, 3)  # f32[n_kv, g, T, D]
    kt = k.transpose(1, 2, 0)[:, None]  # f32[n_kv, 1, D, S]
    scores = (qg @ kt) * np.float32(d**-0.5)  # f32[n_kv, g, T, S]
    future = np.arange(s)[None, :] > (start + np.arange(t))[:, None]  # bool[T, S]
    scores = np.where(future, np.float32(-np.inf), scores)
    probs = F.softmax(scores)
    out = probs @ v.transpose(1, 0, 2)[:, None]  # f32[n_kv, g, T, D]
    return out.transpose(2, 0, 1, 3).reshape(t, n_heads * d)


class ReferenceModel:
    """Dense float32 LLaMA / Mistral / Qwen2 decoder with a KV cache.

    Parameters
    ----------
    config : ModelConfig
    weights : mapping
        HF tensor name -> array (any float dtype; converted to float32 once, here). A
        :class:`~llm.storage.checkpoint.Checkpoint` works too.

    Examples
    --------
    >>> model = ReferenceModel(config, weights)
    >>> logits = model.prefill([1, 17, 42])          # f32[3, vocab]
    >>> nxt = model.decode(int(logits[-1].argmax()))  # f32[vocab], at position 3
    """

    def __init__(self, config: ModelConfig, weights: Mapping):
        lazy_shapes = getattr(weights, "shapes", None)  # lazy readers list shapes unread
        shapes = (
            lazy_shapes()
            if callable(lazy_shapes)
            else {name: np.shape(value) for name, value in weights.items()}
        )
        if config.tie_word_embeddings:
            shapes.pop("lm_head.weight", None)  # HF ignores it too: the embeddings are used
        check_weights(config, shapes)
        self.config = config
        self.w = {
            name: np.ascontiguousarray(weights[name], dtype=np.float32)
            for name in config.tensor_shapes()
        }
        self.lm_head = lm_head_weight(config, self.w)  # f32[vocab, hidden]
        self.inv_freq = rope.inv_freq_for(config)  # f32[D/2]
        self.reset()

    def reset(self) -> None:
        """Empty the KV cache."""
        c = self.config
        empty = np.zeros((0, c.num_kv_heads, c.head_dim), dtype=np.float32)
        self.k_cache = [empty] * c.num_layers  # f32[S, n_kv, D] each
        self.v_cache = [empty] * c.num_layers

    @property
    def position(self) -> int:
        """Number of cached positions (the absolute position of the next token)."""
        return self.k_cache[0].shape[0]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        """x f32[T, in] @ W[out, in].T (+ bias) -> f32[T, out]."""
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _layer(self, i: int, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """One decoder block on x f32[T, hidden]; appends this step's K/V to layer i's cache."""
        c, p = self.config, f"model.layers.{i}."
        t = x.shape[0]
        h = rms_norm(x, self.w[p + "input_layernorm.weight"], c.rms_norm_eps)
        q = self._linear(h, p + "self_attn.q_proj").reshape(t, c.num_heads, c.head_dim)
        k = self._linear(h, p + "self_attn.k_proj").reshape(t, c.num_kv_heads, c.head_dim)
        v = self._linear(h, p + "self_attn.v_proj").reshape(t, c.num_kv_heads, c.head_dim)
        q, k = F.rope_half(q, cos, sin), F.rope_half(k, cos, sin)
        start = self.k_cache[i].shape[0]
        self.k_cache[i] = np.concatenate([self.k_cache[i], k])
        self.v_cache[i] = np.concatenate([self.v_cache[i], v])
        a = attention(q, self.k_cache[i], self.v_cache[i], start)  # f32[T, n_heads * D]
        x = x + self._linear(a, p + "self_attn.o_proj")
        h = rms_norm(x, self.w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
        m = F.swiglu(self._linear(h, p + "mlp.gate_proj"), self._linear(h, p + "mlp.up_proj"))
        return x + self._linear(m, p + "mlp.down_proj")

    def forward(self, tokens: Iterable[int]) -> np.ndarray:
        """Run ``T`` tokens at the next positions, extending the cache.

        Returns
        -------
        f32[T, vocab]
            Logits of each position.
        """
        c = self.config
        ids = np.asarray(list(tokens), dtype=np.int64)
        start = self.position
        if ids.size == 0:
            raise ValueError("no tokens to run")
        if start + ids.size > c.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + ids.size} tokens exceeds the context "
                f"({c.max_position_embeddings})"
            )
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(f"token ids must be in 0..{c.vocab_size - 1}")
        cos, sin = rope.cos_sin(self.inv_freq, start + np.arange(ids.size))  # f32[T, D]
        x = self.w["model.embed_tokens.weight"][ids]  # f32[T, hidden]
        for i in range(c.num_layers):
            x = self._layer(i, x, cos, sin)
        x = rms_norm(x, self.w["model.norm.weight"], c.rms_norm_eps)
        return x @ self.lm_head.T  # f32[T, vocab]

    def prefill(self, tokens: Iterable[int]) -> np.ndarray:
        """Reset the cache and run the prompt; returns logits f32[T, vocab]."""
        self.reset()
        return self.forward(tokens)

    def decode(self, token: int) -> np.ndarray:
        """Run one token at the next position; returns logits f32[vocab]."""
        return self.forward([int(token)])[0]

    def generate(
        self,
        prompt_ids: Iterable[int],
        max_new_tokens: int,
        sampler: Callable[[np.ndarray], int] | None = None,
        stop_ids: Iterable[int] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> list[int]:
        """Prefill the prompt, then decode up to ``max_new_tokens`` tokens.

        Parameters
        ----------
        prompt_ids : int[T]
        max_new_tokens : int
        sampler : callable, optional
            ``logits f32[vocab] -> token id``; greedy (lowest index on ties) by default.
        stop_ids : ints, optional
            Generation ends after emitting one of these (it is included in the result).
            Defaults to the config's eos ids; pass ``()`` to never stop early.
        on_token : callable, optional
            Called with each new token as it is chosen (for streaming).

        Returns
        -------
        list of int
            The new tokens only.
        """
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) + max_new_tokens - 1 > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {len(prompt)} tokens + {max_new_tokens} new tokens "
                f"exceeds the context ({self.config.max_position_embeddings})"
            )
        pick = sampler if sampler is not None else _greedy
        stops = set(self.config.eos_ids if stop_ids is None else (int(s) for s in stop_ids))
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits = self.prefill(prompt)[-1]
        while True:
            token = int(pick(logits))
            out.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops or len(out) == max_new_tokens:
                return out
            logits = self.decode(token)


def _greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits))

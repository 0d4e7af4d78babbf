"""Model weights as global tile arrays for the prefill mesh (host side, offline).

Prefill multiplies activations ``X[T, in]`` (natural tiles: tokens along y, features along x)
by weights with MeshGEMM, so every projection ``W[in, out]`` (math layout, features permuted
and padded by :class:`~llm.layout.PhaseLayout`) is stored **pre-skewed on the host** by
``prepare_b(W, mesh, "meshgemm")``: tiles ``f32[Py, Px, in/Py, out/Px]``. The products come out
in natural tiles again, so layers chain without re-layout.

Projections that read the same input are fused *per core*: the output columns are arranged so
that core column ``px`` holds ``[q seg px | k seg px | v seg px]`` (and ``[gate seg px | up seg
px]``); one MeshGEMM computes all of them and the split is local. Because query feature
``kv_feature * G + g`` sits next to its K/V feature (:mod:`llm.layout`), the q segment of a core
is exactly ``G`` times its K/V segment.

Per-feature vectors (norm weights, biases, RoPE frequencies, K/V head labels) are stored like
decode's X-vectors: core ``(py, px)`` holds feature segment ``px``.

Names follow :func:`llm.mesh_weights.decode_tiles`: ``layer{i}/{key}`` and global keys.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from meshrt.mesh import to_tiles
from meshrt.ops.gemm import prepare_b
from meshrt.ops.gemv import vector_tiles

from .checkpoint import lm_head_weight
from .layout import PhaseLayout


def _mesh(lay: PhaseLayout) -> tuple[int, int]:
    return lay.py, lay.px


def _xvec(lay: PhaseLayout, v: np.ndarray, perm, size: int) -> np.ndarray:
    """A per-feature vector as ``f32[Py, Px, size/Px]`` (segment px on every row of cores)."""
    return vector_tiles(lay.take(v, perm, 0, size), _mesh(lay), "x")


def per_core_columns(mats: list, px: int) -> np.ndarray:
    """``[in, n_i]`` matrices side by side so that column segment ``px`` of the result is
    ``[seg px of mats[0] | seg px of mats[1] | ...]``."""
    rows = mats[0].shape[0]
    return np.concatenate([m.reshape(rows, px, -1) for m in mats], axis=2).reshape(rows, -1)


def _skewed(lay: PhaseLayout, w: np.ndarray) -> np.ndarray:
    return prepare_b(w, _mesh(lay), "meshgemm")


def prefill_layer_tiles(lay: PhaseLayout, w: Mapping, layer: int) -> dict:
    """Global prefill tiles of one layer. ``w`` maps HF tensor names to arrays.

    Returns
    -------
    dict
        ``attn_norm``, ``mlp_norm``: ``f32[Py, Px, H/Px]``;
        ``qkv``: ``f32[Py, Px, H/Py, (q + 2 kv)/Px]`` pre-skewed, per core ``q | k | v``;
        ``o``: ``f32[Py, Px, q/Py, H/Px]`` pre-skewed (rows in q order);
        ``gate_up``: ``f32[Py, Px, H/Py, 2 F/Px]`` pre-skewed, per core ``gate | up``;
        ``down``: ``f32[Py, Px, F/Py, H/Px]`` pre-skewed;
        biases ``f32[Py, Px, n/Px]`` (per core like their projection's columns) when present.
    """
    c = lay.config
    px = lay.px
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    m = p + "mlp."
    out = {"attn_norm": _xvec(lay, w[p + "input_layernorm.weight"], None, lay.hidden),
           "mlp_norm": _xvec(lay, w[p + "post_attention_layernorm.weight"], None, lay.hidden)}
    parts = [(a + "q_proj", lay.q_perm, lay.q), (a + "k_proj", lay.kv_perm, lay.kv),
             (a + "v_proj", lay.kv_perm, lay.kv)]
    out["qkv"] = _skewed(lay, per_core_columns(
        [lay.linear(w[n + ".weight"], perm, size, None, lay.hidden) for n, perm, size in parts],
        px))
    if c.attention_bias:
        out["qkv_bias"] = np.concatenate(
            [_xvec(lay, w[n + ".bias"], perm, size) for n, perm, size in parts], axis=-1)
    out["o"] = _skewed(lay, lay.linear(w[a + "o_proj.weight"], None, lay.hidden, lay.q_perm,
                                       lay.q))
    if c.attention_out_bias:
        out["o_bias"] = _xvec(lay, w[a + "o_proj.bias"], None, lay.hidden)
    out["gate_up"] = _skewed(lay, per_core_columns(
        [lay.linear(w[m + n + ".weight"], None, lay.ffn, None, lay.hidden)
         for n in ("gate_proj", "up_proj")], px))
    out["down"] = _skewed(lay, lay.linear(w[m + "down_proj.weight"], None, lay.hidden, None,
                                          lay.ffn))
    if c.mlp_bias:
        out["gate_up_bias"] = np.concatenate(
            [_xvec(lay, w[m + n + ".bias"], None, lay.ffn) for n in ("gate_proj", "up_proj")],
            axis=-1)
        out["down_bias"] = _xvec(lay, w[m + "down_proj.bias"], None, lay.hidden)
    return out


def prefill_global_tiles(lay: PhaseLayout, w: Mapping) -> dict:
    """Global prefill tiles shared by all layers.

    Returns
    -------
    dict
        ``embed``: ``f32[Py, Px, V/Py, H/Px]``, natural (vocabulary rows along y, hidden
        features along x: a lookup moves rows along y only);
        ``final_norm``: ``f32[Py, Px, H/Px]``;
        ``lm_head``: ``f32[Py, Px, H/Py, V/Px]`` pre-skewed (the embeddings when tied), for the
        logits of every prompt token (the first new token uses the decode LM head);
        ``rope_freq``: ``f32[Py, Px, kv/Px]``; ``kv_head``: ``f32[Py, Px, kv/Px, n_kv]`` one-hot.
    """
    c = lay.config
    mesh = _mesh(lay)
    emb = lay.take(lay.take(w["model.embed_tokens.weight"], None, 0, lay.vocab), None, 1,
                   lay.hidden)
    return {"embed": np.ascontiguousarray(to_tiles(emb, mesh)),
            "final_norm": _xvec(lay, w["model.norm.weight"], None, lay.hidden),
            "lm_head": _skewed(lay, lay.linear(lm_head_weight(c, w), None, lay.vocab, None,
                                               lay.hidden)),
            "rope_freq": vector_tiles(lay.rope_freq, mesh, "x"),
            "kv_head": np.ascontiguousarray(np.moveaxis(
                vector_tiles(lay.head_onehot().T, mesh, "x"), 2, 3))}


def prefill_tiles(lay: PhaseLayout, w: Mapping):
    """Every prefill tile array as ``(name, tiles)``: the global keys, then ``layer{i}/{key}``.

    A generator, so a converter holds one layer's tiles at a time.
    """
    yield from prefill_global_tiles(lay, w).items()
    for i in range(lay.config.num_layers):
        for key, tiles in prefill_layer_tiles(lay, w, i).items():
            yield f"layer{i}/{key}", tiles


def prefill_tile_shapes(lay: PhaseLayout) -> dict[str, tuple]:
    """Global tile shape ``(Py, Px, *tile)`` of every tensor :func:`prefill_tiles` yields,
    computed without weights."""
    c = lay.config
    py, px = lay.py, lay.px
    mesh = (py, px)
    h_x, h_y = lay.hidden // px, lay.hidden // py
    q_x, kv_x, f_x = lay.q // px, lay.kv // px, lay.ffn // px
    shapes = {"embed": mesh + (lay.vocab // py, h_x), "final_norm": mesh + (h_x,),
              "lm_head": mesh + (h_y, lay.vocab // px), "rope_freq": mesh + (kv_x,),
              "kv_head": mesh + (kv_x, c.num_kv_heads)}
    layer = {"attn_norm": mesh + (h_x,), "mlp_norm": mesh + (h_x,),
             "qkv": mesh + (h_y, q_x + 2 * kv_x)}
    if c.attention_bias:
        layer["qkv_bias"] = mesh + (q_x + 2 * kv_x,)
    layer["o"] = mesh + (lay.q // py, h_x)
    if c.attention_out_bias:
        layer["o_bias"] = mesh + (h_x,)
    layer["gate_up"] = mesh + (h_y, 2 * f_x)
    layer["down"] = mesh + (lay.ffn // py, h_x)
    if c.mlp_bias:
        layer["gate_up_bias"] = mesh + (2 * f_x,)
        layer["down_bias"] = mesh + (h_x,)
    for i in range(c.num_layers):
        for key, shape in layer.items():
            shapes[f"layer{i}/{key}"] = shape
    return shapes


def prefill_weight_words(lay: PhaseLayout) -> int:
    """Weight elements stored per core for prefill (every tile of :func:`prefill_tiles`)."""
    return sum(int(np.prod(s[2:])) for s in prefill_tile_shapes(lay).values())

"""Model weights as global tile arrays for the decode mesh (host side, offline).

Each function returns global tiles ``[Py, Px, ...]``; a rank keeps its block ``[by, bx, ...]``
(``meshrt.darray.local_block``) and a converter writes exactly those blocks into the rank's shard.
Layouts follow MeshGEMV (``meshrt.ops.gemv``): weights whose input is a Y-vector are tiles
``W[in-seg py, out-seg px]``; weights whose input is an X-vector are stored transposed,
``W[in-seg px, out-seg py]``. Projections that read the same input are fused per core
(q|k|v, gate|up): one local GEMV and one allreduce for all of them.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from meshrt.ops.gemv import vector_tiles, weight_tiles

from .checkpoint import lm_head_weight
from .layout import PhaseLayout
from .prefill_weights import prefill_tiles


def _vec(lay: PhaseLayout, v: np.ndarray, perm, size: int, axis: str) -> np.ndarray:
    return vector_tiles(lay.take(v, perm, 0, size), (lay.py, lay.px), axis)


def decode_layer_tiles(lay: PhaseLayout, w: Mapping, layer: int) -> dict:
    """Global decode tiles of one layer. ``w`` maps HF tensor names to arrays.

    Returns
    -------
    dict
        ``attn_norm``, ``mlp_norm``: ``f32[Py, Px, H/Py]`` (Y-vectors);
        ``qkv``: ``f32[Py, Px, H/Py, (q + 2 kv)/Px]`` (q|k|v per core);
        ``o``: ``f32[Py, Px, q/Px, H/Py]`` (transposed placement);
        ``gate_up``: ``f32[Py, Px, H/Py, 2 F/Px]``; ``down``: ``f32[Py, Px, F/Px, H/Py]``;
        biases as X- or Y-vectors when the model has them.
    """
    c = lay.config
    mesh = (lay.py, lay.px)
    p = f"model.layers.{layer}."
    a = p + "self_attn."
    out = {}
    out["attn_norm"] = _vec(lay, w[p + "input_layernorm.weight"], None, lay.hidden, "y")
    out["mlp_norm"] = _vec(lay, w[p + "post_attention_layernorm.weight"], None, lay.hidden, "y")
    parts = [(a + "q_proj", lay.q_perm, lay.q), (a + "k_proj", lay.kv_perm, lay.kv),
             (a + "v_proj", lay.kv_perm, lay.kv)]
    out["qkv"] = np.concatenate(
        [weight_tiles(lay.linear(w[n + ".weight"], perm, size, None, lay.hidden), mesh, "y")
         for n, perm, size in parts], axis=-1)
    if c.attention_bias:
        out["qkv_bias"] = np.concatenate(
            [_vec(lay, w[n + ".bias"], perm, size, "x") for n, perm, size in parts], axis=-1)
    out["o"] = weight_tiles(lay.linear(w[a + "o_proj.weight"], None, lay.hidden, lay.q_perm, lay.q),
                            mesh, "x")
    if c.attention_out_bias:
        out["o_bias"] = _vec(lay, w[a + "o_proj.bias"], None, lay.hidden, "y")
    m = p + "mlp."
    out["gate_up"] = np.concatenate(
        [weight_tiles(lay.linear(w[m + n + ".weight"], None, lay.ffn, None, lay.hidden), mesh, "y")
         for n in ("gate_proj", "up_proj")], axis=-1)
    out["down"] = weight_tiles(lay.linear(w[m + "down_proj.weight"], None, lay.hidden, None,
                                          lay.ffn), mesh, "x")
    if c.mlp_bias:
        out["gate_up_bias"] = np.concatenate(
            [_vec(lay, w[m + n + ".bias"], None, lay.ffn, "x") for n in ("gate_proj", "up_proj")],
            axis=-1)
        out["down_bias"] = _vec(lay, w[m + "down_proj.bias"], None, lay.hidden, "y")
    return out


def decode_global_tiles(lay: PhaseLayout, w: Mapping) -> dict:
    """Global decode tiles shared by all layers.

    Returns
    -------
    dict
        ``embed``: ``f32[Py, Px, V/Px, H/Py]`` (rows of vocabulary segment px, hidden segment
        py: a lookup is a broadcast along x from the column holding the token);
        ``final_norm``: Y-vector; ``lm_head``: ``f32[Py, Px, H/Py, V/Px]`` (absent when the
        embeddings are tied: the embedding tiles serve, transposed per tile);
        ``rope_freq``: ``f32[Py, Px, kv/Px]``; ``kv_head``: ``f32[Py, Px, kv/Px, n_kv]`` one-hot.
    """
    c = lay.config
    mesh = (lay.py, lay.px)
    emb = lay.take(lay.take(w["model.embed_tokens.weight"], None, 0, lay.vocab), None, 1,
                   lay.hidden)
    out = {"embed": weight_tiles(emb, mesh, "x"),
           "final_norm": _vec(lay, w["model.norm.weight"], None, lay.hidden, "y"),
           "rope_freq": vector_tiles(lay.rope_freq, mesh, "x"),
           "kv_head": np.ascontiguousarray(np.moveaxis(
               vector_tiles(lay.head_onehot().T, mesh, "x"), 2, 3))}
    if not c.tie_word_embeddings:
        out["lm_head"] = weight_tiles(lay.linear(lm_head_weight(c, w), None, lay.vocab, None,
                                                 lay.hidden), mesh, "y")
    return out


def decode_tiles(lay: PhaseLayout, w: Mapping):
    """Every decode tile array as ``(name, tiles)``: ``layer{i}/{key}`` and the global ``{key}``.

    A generator, so a converter holds one tensor's tiles at a time.
    """
    for key, tiles in decode_global_tiles(lay, w).items():
        yield key, tiles
    for i in range(lay.config.num_layers):
        for key, tiles in decode_layer_tiles(lay, w, i).items():
            yield f"layer{i}/{key}", tiles


#: phase -> tile producer ``f(PhaseLayout, hf_weights)`` yielding ``(name, global tiles)``.
PHASE_TILES = {"decode": decode_tiles, "prefill": prefill_tiles}

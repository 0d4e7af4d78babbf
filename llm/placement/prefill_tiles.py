"""Model weights as tiles of the prefill mesh: what every core holds, described once.

:func:`prefill_specs` describes every prefill tensor without data (:mod:`llm.placement.streamed`); a
rank's blocks are placed from the specs straight from the source, and :func:`prefill_tiles`
makes the global tiles a converter writes.

Prefill multiplies activations ``X[T, in]`` (natural tiles: tokens along y, features along x)
by weights with MeshGEMM, so every projection ``W[in, out]`` (math layout, features permuted
and padded by :class:`~llm.placement.layout.PhaseLayout`) is stored **pre-skewed on the host** as
``prepare_b(W, mesh, "meshgemm")`` would (:func:`meshrt.ops.gemm.prepare_b_region`): tiles
``[Py, Px, in/Py, out/Px]``. The products come out in natural tiles again, so layers chain
without re-layout.

Projections that read the same input are fused *per core*: the output columns are arranged so
that core column ``px`` holds ``[q seg px | k seg px | v seg px]`` (and ``[gate seg px | up seg
px]``); one MeshGEMM computes all of them and the split is local. Because query feature
``kv_feature * G + g`` sits next to its K/V feature (:mod:`llm.placement.layout`), the q segment of
a core
is exactly ``G`` times its K/V segment.

Per-feature vectors (norm weights, biases, RoPE frequencies, K/V head labels) are stored like
decode's X-vectors: core ``(py, px)`` holds feature segment ``px``.

Names follow :func:`llm.placement.decode_tiles.decode_tiles`: ``layer{i}/{key}`` and global keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .layout import PhaseLayout
from .streamed import Const, Matrix, Vector, place


def prefill_specs(lay: PhaseLayout) -> dict:
    """Every prefill tensor as a placement spec (:mod:`llm.placement.streamed`), in production
    order:
    the global keys, then ``layer{i}/{key}``.

    Tiles (global shapes; a rank holds ``[by, bx, ...]``)::

        embed       [Py, Px, V/Py, H/Px]  natural (vocabulary rows along y, hidden features
                                          along x: a lookup moves rows along y only)
        final_norm  [Py, Px, H/Px]
        lm_head     [Py, Px, H/Py, V/Px]  pre-skewed (the embeddings when tied), for the logits
                                          of every prompt token (the first new token uses the
                                          decode LM head)
        rope_freq   [Py, Px, kv/Px]; kv_head [Py, Px, kv/Px, n_kv] one-hot
        layer{i}/attn_norm, mlp_norm  [Py, Px, H/Px]
        layer{i}/qkv      [Py, Px, H/Py, (q + 2 kv)/Px]  pre-skewed, per core q | k | v
        layer{i}/o        [Py, Px, q/Py, H/Px]           pre-skewed (rows in q order)
        layer{i}/gate_up  [Py, Px, H/Py, 2 F/Px]         pre-skewed, per core gate | up
        layer{i}/down     [Py, Px, F/Py, H/Px]           pre-skewed
        biases [Py, Px, n/Px] (per core like their projection's columns) when present
    """
    from .decode_tiles import embedding_part, kv_head_tiles, layer_tensors, lm_head_part, rope_tiles
    from .streamed import feature_index

    c = lay.config
    specs = {
        "embed": Matrix((embedding_part(lay),), "gemv_y"),
        "final_norm": Vector(
            (("model.norm.weight", feature_index(None, c.hidden_size, lay.hidden)),), "x"
        ),
        "lm_head": Matrix((lm_head_part(lay),), "skew"),
        "rope_freq": Const(lambda: rope_tiles(lay)),
        "kv_head": Const(lambda: kv_head_tiles(lay)),
    }
    for i in range(c.num_layers):
        for key, matrix, vector in layer_tensors(lay, i):
            specs[f"layer{i}/{key}"] = (
                Matrix(matrix, "skew", fuse=lay.px) if matrix is not None else Vector(vector, "x")
            )
    return specs


def prefill_tiles(lay: PhaseLayout, w: Mapping):
    """Every prefill tile array as ``(name, global f32 tiles)``, in :func:`prefill_specs` order.

    A generator, so a converter holds one tensor's tiles at a time.
    """
    for name, spec in prefill_specs(lay).items():
        yield name, place(spec, w, (lay.py, lay.px))


def prefill_tile_shapes(lay: PhaseLayout) -> dict[str, tuple]:
    """Global tile shape ``(Py, Px, *tile)`` of every tensor :func:`prefill_tiles` yields,
    computed without weights."""
    c = lay.config
    py, px = lay.py, lay.px
    mesh = (py, px)
    h_x, h_y = lay.hidden // px, lay.hidden // py
    q_x, kv_x, f_x = lay.q // px, lay.kv // px, lay.ffn // px
    shapes = {
        "embed": mesh + (lay.vocab // py, h_x),
        "final_norm": mesh + (h_x,),
        "lm_head": mesh + (h_y, lay.vocab // px),
        "rope_freq": mesh + (kv_x,),
        "kv_head": mesh + (kv_x, c.num_kv_heads),
    }
    layer = {
        "attn_norm": mesh + (h_x,),
        "mlp_norm": mesh + (h_x,),
        "qkv": mesh + (h_y, q_x + 2 * kv_x),
    }
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

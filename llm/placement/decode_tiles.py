"""Model weights as tiles of the decode mesh: what every core holds, described once.

:func:`decode_specs` describes every decode tensor without data (:mod:`llm.placement.streamed`); one
rank's blocks are placed from them straight from the source (:meth:`llm.engine.model.MeshModel
.from_weights`), and :func:`decode_tiles` makes the global tiles ``[Py, Px, ...]`` a converter
writes. Layouts follow MeshGEMV (``meshrt.ops.gemv``): weights whose input is a Y-vector are
tiles ``W[in-seg py, out-seg px]``; weights whose input is an X-vector are stored transposed,
``W[in-seg px, out-seg py]``. Projections that read the same input are fused per core
(q|k|v, gate|up): one local GEMV and one allreduce for all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from meshrt.ops.gemv import stream_layout, vector_tiles

from .layout import PhaseLayout
from .streamed import Const, Matrix, Part, Vector, feature_index, place


def lm_head_name(config) -> str:
    """Source tensor of the output projection (the embeddings when tied)."""
    return "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


def linear_part(
    lay: PhaseLayout,
    name: str,
    out_perm,
    out_real: int,
    out_size: int,
    in_perm,
    in_real: int,
    in_size: int,
) -> Part:
    """An HF linear ``[out, in]`` with permuted, padded mesh features."""
    return Part(
        name, feature_index(out_perm, out_real, out_size), feature_index(in_perm, in_real, in_size)
    )


def layer_parts(lay: PhaseLayout, layer: int) -> dict:
    """The HF linears of one layer as :class:`~llm.placement.streamed.Part` lists, by fused
    group."""
    c = lay.config
    a = f"model.layers.{layer}.self_attn."
    m = f"model.layers.{layer}.mlp."
    h = c.hidden_size

    def lin(name, out_perm, out_real, out_size, in_perm, in_real, in_size):
        return linear_part(lay, name, out_perm, out_real, out_size, in_perm, in_real, in_size)

    return {
        "qkv": (
            lin(a + "q_proj.weight", lay.q_perm, None, lay.q, None, h, lay.hidden),
            lin(a + "k_proj.weight", lay.kv_perm, None, lay.kv, None, h, lay.hidden),
            lin(a + "v_proj.weight", lay.kv_perm, None, lay.kv, None, h, lay.hidden),
        ),
        "o": (lin(a + "o_proj.weight", None, h, lay.hidden, lay.q_perm, None, lay.q),),
        "gate_up": tuple(
            lin(m + n + ".weight", None, c.intermediate_size, lay.ffn, None, h, lay.hidden)
            for n in ("gate_proj", "up_proj")
        ),
        "down": (
            lin(m + "down_proj.weight", None, h, lay.hidden, None, c.intermediate_size, lay.ffn),
        ),
    }


def layer_vectors(lay: PhaseLayout, layer: int) -> dict[str, tuple[tuple[str, np.ndarray], ...]]:
    """Norm weights and biases of one layer: ``key -> ((name, index), ...)`` per fused group."""
    c = lay.config
    p = f"model.layers.{layer}."
    a, m = p + "self_attn.", p + "mlp."
    h, f = c.hidden_size, c.intermediate_size
    out: dict[str, tuple[tuple[str, np.ndarray], ...]] = {
        "attn_norm": ((p + "input_layernorm.weight", feature_index(None, h, lay.hidden)),),
        "mlp_norm": ((p + "post_attention_layernorm.weight", feature_index(None, h, lay.hidden)),),
    }
    if c.attention_bias:
        out["qkv_bias"] = (
            (a + "q_proj.bias", feature_index(lay.q_perm, None, lay.q)),
            (a + "k_proj.bias", feature_index(lay.kv_perm, None, lay.kv)),
            (a + "v_proj.bias", feature_index(lay.kv_perm, None, lay.kv)),
        )
    if c.attention_out_bias:
        out["o_bias"] = ((a + "o_proj.bias", feature_index(None, h, lay.hidden)),)
    if c.mlp_bias:
        out["gate_up_bias"] = tuple(
            (m + n + ".bias", feature_index(None, f, lay.ffn)) for n in ("gate_proj", "up_proj")
        )
        out["down_bias"] = ((m + "down_proj.bias", feature_index(None, h, lay.hidden)),)
    return out


LAYER_KEYS = (
    "attn_norm",
    "mlp_norm",
    "qkv",
    "qkv_bias",
    "o",
    "o_bias",
    "gate_up",
    "down",
    "gate_up_bias",
    "down_bias",
)


def layer_tensors(lay: PhaseLayout, layer: int):
    """The tensors of one layer in placement order, for every phase's registry.

    Yields ``(key, parts, None)`` for a fused linear (:func:`layer_parts`) and
    ``(key, None, entries)`` for a norm weight or bias (:func:`layer_vectors`); keys the
    model does not have are skipped.
    """
    parts, vecs = layer_parts(lay, layer), layer_vectors(lay, layer)
    for key in LAYER_KEYS:
        if key in parts:
            yield key, parts[key], None
        elif key in vecs:
            yield key, None, vecs[key]


def embedding_part(lay: PhaseLayout) -> Part:
    """The embedding table as ``W[in=vocabulary, out=hidden]`` (stored ``[in, out]``)."""
    c = lay.config
    return Part(
        "model.embed_tokens.weight",
        feature_index(None, c.hidden_size, lay.hidden),
        feature_index(None, c.vocab_size, lay.vocab),
        table=True,
    )


def lm_head_part(lay: PhaseLayout) -> Part:
    """The LM head as ``W[in=hidden, out=vocabulary]`` (an HF linear, or the tied table)."""
    c = lay.config
    return Part(
        lm_head_name(c),
        feature_index(None, c.vocab_size, lay.vocab),
        feature_index(None, c.hidden_size, lay.hidden),
    )


def rope_tiles(lay: PhaseLayout) -> np.ndarray:
    return vector_tiles(lay.rope_freq, (lay.py, lay.px), "x")


def kv_head_tiles(lay: PhaseLayout) -> np.ndarray:
    return np.ascontiguousarray(
        np.moveaxis(vector_tiles(lay.head_onehot().T, (lay.py, lay.px), "x"), 2, 3)
    )


def decode_specs(lay: PhaseLayout) -> dict:
    """Every decode tensor as a placement spec, in production order: the global keys, then
    ``layer{i}/{key}``.

    Tiles (global shapes; a rank holds ``[by, bx, ...]``)::

        embed       [Py, Px, V/Px, H/Py]  rows of vocabulary segment px, hidden segment py: a
                                          lookup is a broadcast along x from the column holding
                                          the token
        final_norm  [Py, Px, H/Py]        Y-vector
        lm_head     [Py, Px, H/Py, V/Px]  absent when tied (the embedding tiles serve,
                                          transposed per tile)
        rope_freq   [Py, Px, kv/Px]; kv_head [Py, Px, kv/Px, n_kv] one-hot
        layer{i}/attn_norm, mlp_norm  [Py, Px, H/Py]  (Y-vectors)
        layer{i}/qkv      [Py, Px, H/Py, (q + 2 kv)/Px]  q|k|v per core
        layer{i}/o        [Py, Px, q/Px, H/Py]           transposed placement
        layer{i}/gate_up  [Py, Px, H/Py, 2 F/Px];  layer{i}/down [Py, Px, F/Px, H/Py]
        biases as X- or Y-vectors when the model has them
    """
    c = lay.config
    h = c.hidden_size
    specs = {
        "embed": Matrix((embedding_part(lay),), "gemv_x"),
        "final_norm": Vector((("model.norm.weight", feature_index(None, h, lay.hidden)),), "y"),
        "rope_freq": Const(lambda: rope_tiles(lay)),
        "kv_head": Const(lambda: kv_head_tiles(lay)),
    }
    if not c.tie_word_embeddings:
        specs["lm_head"] = Matrix((lm_head_part(lay),), "gemv_y")
    y_input = {"qkv": True, "o": False, "gate_up": True, "down": False}
    vec_axis = {
        "attn_norm": "y",
        "mlp_norm": "y",
        "qkv_bias": "x",
        "o_bias": "y",
        "gate_up_bias": "x",
        "down_bias": "y",
    }
    for i in range(c.num_layers):
        for key, matrix, vector in layer_tensors(lay, i):
            if matrix is not None:
                y = y_input[key]
                specs[f"layer{i}/{key}"] = Matrix(
                    matrix, "gemv_y" if y else "gemv_x", fuse=lay.px if y else lay.py
                )
            else:
                specs[f"layer{i}/{key}"] = Vector(vector, vec_axis[key])
    return specs


def stream_gemv_weights(blocks: dict, specs: Mapping) -> None:
    """Put every float32 GEMV weight of this rank's decode ``blocks`` (not the embedding,
    which is looked up) in :func:`meshrt.ops.gemv.stream_layout` memory, in place: the same
    shapes and values, a line of cores multiplied in one pass. Entries are replaced one at a
    time, so only one tensor is ever held twice. 16-bit words keep their memory (they are
    widened a few core rows at a time)."""
    for name in list(blocks):  # names only: the old block is freed as soon as it is replaced
        spec = specs.get(name)
        block = blocks[name]
        if (
            name != "embed"
            and isinstance(spec, Matrix)
            and spec.input_axis is not None
            and isinstance(block, np.ndarray)
            and block.dtype == np.float32
        ):
            blocks[name] = stream_layout(block, spec.input_axis)
        del block


def decode_tiles(lay: PhaseLayout, w: Mapping):
    """Every decode tile array as ``(name, global f32 tiles)``, in :func:`decode_specs` order.

    A generator, so a converter holds one tensor's tiles at a time.
    """
    for name, spec in decode_specs(lay).items():
        yield name, place(spec, w, (lay.py, lay.px))


def decode_tile_shapes(lay: PhaseLayout) -> dict[str, tuple]:
    """Global tile shape ``(Py, Px, *tile)`` of every tensor
    :func:`llm.placement.decode_tiles.decode_tiles`
    produces, computed without weights (names as there: ``embed``, ``layer0/qkv``, ...)."""
    c = lay.config
    py, px = lay.py, lay.px
    h_y, v_x = lay.hidden // py, lay.vocab // px
    q_x, kv_x, f_x = lay.q // px, lay.kv // px, lay.ffn // px
    mesh = (py, px)
    shapes = {
        "embed": mesh + (v_x, h_y),
        "final_norm": mesh + (h_y,),
        "rope_freq": mesh + (kv_x,),
        "kv_head": mesh + (kv_x, c.num_kv_heads),
    }
    if not c.tie_word_embeddings:
        shapes["lm_head"] = mesh + (h_y, v_x)
    layer = {
        "attn_norm": mesh + (h_y,),
        "mlp_norm": mesh + (h_y,),
        "qkv": mesh + (h_y, q_x + 2 * kv_x),
    }
    if c.attention_bias:
        layer["qkv_bias"] = mesh + (q_x + 2 * kv_x,)
    layer["o"] = mesh + (q_x, h_y)
    if c.attention_out_bias:
        layer["o_bias"] = mesh + (h_y,)
    layer["gate_up"] = mesh + (h_y, 2 * f_x)
    layer["down"] = mesh + (f_x, h_y)
    if c.mlp_bias:
        layer["gate_up_bias"] = mesh + (2 * f_x,)
        layer["down_bias"] = mesh + (h_y,)
    for i in range(c.num_layers):
        for key, shape in layer.items():
            shapes[f"layer{i}/{key}"] = shape
    return shapes

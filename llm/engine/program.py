"""The layer program: what one token (decode) or one prompt (prefill) does on the mesh, as data.

Each phase's work is an ordered list of :class:`Op` built from the model config and the phase's
:class:`~llm.placement.layout.PhaseLayout`: the per-token head (embedding), one decoder layer
(repeated for every layer under the ledger section ``layer{i}``) and the tail (final norm, LM
head, the pick). Two consumers walk the same list:

* the emulator (:class:`llm.engine.decode.MeshDecoder`, :class:`llm.engine.prefill.MeshPrefiller`)
  executes every op on real blocks, moving data through the fabric;
* the estimator (:mod:`llm.cost.estimate`) runs nothing (no data, like a model built on a meta
  device).

Both price the list with :mod:`llm.engine.kinds`, one cost per op kind, so they write exactly
the same ledger records.

An op names its ledger record once, here (``name``); sub-records are ``name/<part>``. Its
``inputs`` and ``outputs`` name the activations it reads and writes (the emulator keeps them in
a dict per layer), ``axis`` is the mesh axis its reduction runs along, ``dims`` its per-core
sizes.

Op kinds
--------
==================  =========================================================================
kind                what it does (decode: vectors; prefill: token-row tiles)
==================  =========================================================================
``embed_broadcast`` decode: the token's embedding row, multicast along x from its column
``embed_fetch``     prefill: the prompt's embedding rows fetched along y to their token rows
``norm``            RMSNorm: local sum of squares, allreduce along ``axis``, scale
``gemv``            MeshGEMV ``x @ W`` (+ bias), K-tree (or the run's) allreduce
``gemm``            MeshGEMM ``X @ W`` (+ bias)
``rope``            split ``q | k | v`` and rotate q, k at their absolute positions
``kv_append``       decode: the new K/V into the cache (shift policy: rows pass their oldest)
``cache_scores``    decode: ``q . K`` over the cache: local products, allreduce along x
``grouped_scores``  prefill: ``Q K^T`` per K/V head (grouped dist-GEMM-T)
``softmax``         mask, max and sum allreduced along ``axis``, normalise
``cache_pv``        decode: ``P . V`` over the cache: local products, allreduce along y
``grouped_pv``      prefill: ``P V`` per K/V head (grouped MeshGEMM, V skewed on the mesh)
``add``             residual ``x + y`` (free: no record)
``swiglu``          ``silu(gate) * up``
``vocab_mask``      padded vocabulary entries of the logits set to ``-inf`` (free)
``argmax``          greedy pick on the mesh: max, then lowest index, along x
``prompt_logits``   prefill ``all_logits``: the LM head of every prompt token, gathered
==================  =========================================================================
"""

from __future__ import annotations

from meshrt.mesh import X, Y, padded

from ..placement.layout import PhaseLayout
from . import kinds as K
from .kinds import Op, Pass

__all__ = ["Op", "Pass"]  # the op records, defined with their kinds


# ----------------------------------------------------------------------------------------------
# Priced sizes: the padding the wafer carries
# ----------------------------------------------------------------------------------------------


def wafer_sizes(lay: PhaseLayout) -> dict:
    """Feature sizes the ops are priced at: every real dimension padded, matrix by matrix, to a
    multiple of ``lcm(Py, Px)`` (the mesh side on a square mesh), as the wafer pads it.

    The emulator's layout pads further (:class:`~llm.placement.layout.PhaseLayout`: K/V features to
    ``2 lcm`` so RoPE pairs never split, query features to ``G`` times that so a core's query
    heads sit on its K/V features); those extra zeros are computed but never priced.
    """
    c, u = lay.config, lay.unit
    return {
        "hidden": lay.hidden,
        "ffn": lay.ffn,
        "vocab": lay.vocab,
        "q": padded(c.q_size, u),
        "kv": padded(c.kv_size, u),
    }


# ----------------------------------------------------------------------------------------------
# Decode (MeshGEMV, Y/X-vector alternation)
# ----------------------------------------------------------------------------------------------


def _decode_sizes(lay: PhaseLayout) -> dict:
    c, w = lay.config, wafer_sizes(lay)
    return {
        "h_y": w["hidden"] // lay.py,
        "tq": w["q"] // lay.px,
        "tk": w["kv"] // lay.px,
        "tf": w["ffn"] // lay.px,
        "g": c.group_size,
        "nkv": c.num_kv_heads,
        **w,
    }


def _gemv(name, src, dst, m, n, input_axis, weight=None, batch=1):
    return Op(
        "gemv",
        name,
        (src,),
        (dst,),
        dims=K.GemvDims(m, n, input_axis, batch),
        weight=weight or name,
        bias=f"{weight or name}_bias",
    )


def decode_head(lay: PhaseLayout) -> list:
    """The token's embedding row as a Y-vector ``x`` (a batch: each sequence's token from its
    own column, ``x`` then ``f32[by, bx, B, H/Py]``)."""
    s = _decode_sizes(lay)
    return [
        Op("embed_broadcast", "embed", (), ("x",), axis=X, dims=K.RowDims(s["h_y"]), weight="embed")
    ]


def decode_layer(lay: PhaseLayout, batch: int = 1) -> list:
    """One decoder block on the Y-vector ``x`` (see :mod:`llm.engine.decode` for the layouts).

    ``batch`` sequences decode together: every vector op carries ``batch`` vectors (rows of
    norms, RoPE and SwiGLU, right-hand vectors of the GEMVs, words of the reductions), and
    attention runs over each sequence's own cache (the pass's ``fill`` sums their rows).
    """
    s = _decode_sizes(lay)
    tk, tq, nq = s["tk"], s["tq"], s["g"] * s["nkv"]
    b = batch
    return [
        Op(
            "norm",
            "attn_norm",
            ("x",),
            ("h",),
            axis=Y,
            dims=K.RowDims(s["h_y"], b),
            weight="attn_norm",
        ),
        _gemv("qkv", "h", "qkv", s["hidden"], s["q"] + 2 * s["kv"], Y, batch=b),
        Op("rope", "rope", ("qkv",), ("q", "k", "v"), dims=K.RopeDims(b, tq, tk)),
        Op("kv_append", "kv_append", ("k", "v"), (), dims=K.CacheDims(tk=tk)),
        Op(
            "cache_scores",
            "scores",
            ("q",),
            ("s",),
            axis=X,
            dims=K.CacheDims(tq=tq, heads=nq, batch=b),
        ),
        Op(
            "softmax",
            "softmax",
            ("s",),
            ("p",),
            axis=Y,
            dims=K.SoftmaxDims(nq, None, b),
        ),
        Op("cache_pv", "pv", ("p",), ("a",), axis=Y, dims=K.CacheDims(tq=tq, batch=b)),
        _gemv("o", "a", "o", s["q"], s["hidden"], X, batch=b),
        Op("add", "attn_residual", ("x", "o"), ("x",)),
        Op(
            "norm",
            "mlp_norm",
            ("x",),
            ("h",),
            axis=Y,
            dims=K.RowDims(s["h_y"], b),
            weight="mlp_norm",
        ),
        _gemv("gate_up", "h", "gu", s["hidden"], 2 * s["ffn"], Y, batch=b),
        Op("swiglu", "swiglu", ("gu",), ("act",), dims=K.SwigluDims(b, s["tf"])),
        _gemv("down", "act", "d", s["ffn"], s["hidden"], X, batch=b),
        Op("add", "mlp_residual", ("x", "d"), ("x",)),
    ]


def decode_logits(lay: PhaseLayout, batch: int = 1) -> list:
    """Final norm and LM head: the logits as an X-vector (padding ``-inf``), ``batch`` of them."""
    s = _decode_sizes(lay)
    return [
        Op(
            "norm",
            "final_norm",
            ("x",),
            ("h",),
            axis=Y,
            dims=K.RowDims(s["h_y"], batch),
            weight="final_norm",
        ),
        _gemv("lm_head", "h", "logits", s["hidden"], s["vocab"], Y, batch=batch),
        Op("vocab_mask", "vocab_mask", ("logits",), ("logits",)),
    ]


def decode_pick(lay: PhaseLayout, batch: int = 1) -> list:
    """The greedy pick on the mesh (``batch`` tokens at once)."""
    return [Op("argmax", "argmax", ("logits",), ("token",), axis=X, dims=K.PickDims(batch))]


# ----------------------------------------------------------------------------------------------
# Prefill (MeshGEMM, grouped dist-GEMM-T, natural token-row tiles)
# ----------------------------------------------------------------------------------------------


def _prefill_sizes(lay: PhaseLayout, tokens: int) -> dict:
    c, w = lay.config, wafer_sizes(lay)
    tp = padded(tokens, lay.unit)
    return {
        "tp": tp,
        "tl": tp // lay.py,
        "sl": tp // lay.px,
        "hl": w["hidden"] // lay.px,
        "tq": w["q"] // lay.px,
        "tk": w["kv"] // lay.px,
        "tf": w["ffn"] // lay.px,
        "g": c.group_size,
        "nkv": c.num_kv_heads,
        **w,
    }


def _gemm(name, src, dst, m, k, n):
    return Op(
        "gemm",
        name,
        (src,),
        (dst,),
        dims=K.GemmDims(m, k, n),
        weight=name,
        bias=f"{name}_bias",
    )


def prefill_head(lay: PhaseLayout, tokens: int) -> list:
    """The prompt's embedding rows, ``x`` as ``[T/Py, H/Px]`` tiles."""
    s = _prefill_sizes(lay, tokens)
    return [
        Op(
            "embed_fetch",
            "embed",
            (),
            ("x",),
            axis=Y,
            dims=K.FetchDims(s["tl"], s["hl"], lay.vocab // lay.py),
            weight="embed",
        )
    ]


def prefill_layer(lay: PhaseLayout, tokens: int) -> list:
    """One decoder block on every prompt token (see :mod:`llm.engine.prefill` for the layouts)."""
    s = _prefill_sizes(lay, tokens)
    tp, tl, g, nkv = s["tp"], s["tl"], s["g"], s["nkv"]
    norm = K.RowDims(s["hl"], tl)
    return [
        Op("norm", "attn_norm", ("x",), ("h",), axis=X, dims=norm, weight="attn_norm"),
        _gemm("qkv", "h", "qkv", tp, s["hidden"], s["q"] + 2 * s["kv"]),
        Op(
            "rope",
            "rope",
            ("qkv",),
            ("q", "k", "v"),
            dims=K.RopeDims(tl, s["tq"], s["tk"]),
        ),
        Op(
            "grouped_scores",
            "scores",
            ("q", "k"),
            ("s",),
            dims=K.GroupedDims(g * tp, s["kv"], tp, nkv),
        ),
        Op(
            "softmax",
            "softmax",
            ("s",),
            ("p",),
            axis=X,
            dims=K.SoftmaxDims(tl * g * nkv, s["sl"]),
        ),
        Op(
            "grouped_pv",
            "pv",
            ("p", "v"),
            ("a",),
            dims=K.GroupedDims(g * tp, tp, s["kv"], nkv),
        ),
        _gemm("o", "a", "o", tp, s["q"], s["hidden"]),
        Op("add", "attn_residual", ("x", "o"), ("x",)),
        Op("norm", "mlp_norm", ("x",), ("h",), axis=X, dims=norm, weight="mlp_norm"),
        _gemm("gate_up", "h", "gu", tp, s["hidden"], 2 * s["ffn"]),
        Op("swiglu", "swiglu", ("gu",), ("act",), dims=K.SwigluDims(tl, s["tf"])),
        _gemm("down", "act", "d", tp, s["ffn"], s["hidden"]),
        Op("add", "mlp_residual", ("x", "d"), ("x",)),
    ]


def prefill_all_logits(lay: PhaseLayout, tokens: int) -> list:
    """Every prompt token's logits on the prefill mesh (scoring; not on the first-token path)."""
    s = _prefill_sizes(lay, tokens)
    return [
        Op(
            "norm",
            "final_norm",
            ("x",),
            ("h",),
            axis=X,
            dims=K.RowDims(s["hl"], s["tl"]),
            weight="final_norm",
        ),
        _gemm("lm_head", "h", "logits", s["tp"], s["hidden"], s["vocab"]),
        Op(
            "prompt_logits",
            "prompt_logits",
            ("logits",),
            ("all_logits",),
            dims=K.LogitsDims(s["tp"], lay.vocab),
        ),
    ]


def prefill_activation_words(lay: PhaseLayout, tokens: int) -> int:
    """Words per core prefill holds besides its weights: the activations ``[T/Py, H/Px]`` and
    every layer's K and V ``[T/Py, kv/Px]``."""
    tl = padded(tokens, lay.unit) // lay.py
    return tl * lay.hidden // lay.px + 2 * lay.config.num_layers * tl * lay.kv // lay.px

"""The prompt on the prefill mesh (MeshGEMM, grouped dist-GEMM-T), and the hand-off to decode.

Activations are natural tiles: ``X[T, H]`` with tokens along y and features along x, core
``(py, px)`` holding ``X[t-seg py, h-seg px]``, ``f32[by, bx, T/Py, H/Px]``. ``T`` is padded to a
multiple of ``lcm(Py, Px)``; padded token rows are zero at the start, are never attended to (the
causal mask also masks padding keys) and so never change a real row. Per layer::

    X -> RMSNorm (sum along x) -> q|k|v = MeshGEMM -> RoPE (absolute positions, adjacent pairs)
      -> scores = grouped dist-GEMM-T (groups = K/V heads) -> causal mask, softmax along keys
         (max and sum along x) -> P.V = grouped MeshGEMM (V skewed on the mesh)
      -> O-proj = MeshGEMM -> residual -> RMSNorm -> gate|up = MeshGEMM -> SwiGLU
      -> down = MeshGEMM -> residual

Every query head at once: a core's q segment is its K/V segment times ``G`` (query feature
``kv_feature * G + g``), so ``q`` viewed as rows ``(t, g)`` and columns ``kv_feature`` is a
left operand aligned feature by feature with K and V; the group labels (K/V heads) keep heads
apart in the grouped kernels. Nothing is transposed or replicated.

Hand-off (:meth:`MeshPrefiller.handoff_kv`, :meth:`MeshPrefiller.handoff_hidden`): the K/V of
every layer move from the prefill tiles to the decode cache layout through the data plane
(features along x, then tokens along y), and the last token's hidden state becomes a decode
Y-vector; both are priced in the prefill ledger.
"""
from __future__ import annotations

import numpy as np

from meshrt import darray
from meshrt.collectives import KTREE, AllreduceSpec, allreduce, broadcast, broadcast_cost
from meshrt.fabric import Fabric
from meshrt.mesh import MeshError, X, Y, padded
from meshrt.plmr import Cost
from meshrt.ops.gemm import meshgemm
from meshrt.ops.grouped import grouped_gemm_t, grouped_meshgemm
from meshrt.relayout import fetch_rows, move_cost, rank_bounds, rebalance

from .decode import rope_pairs
from .kvcache import ContextFullError, balanced_counts
from .layout import PhaseLayout
from .plan import decode_tile_shapes, weight_words_per_core
from .reference import silu


def handoff_plan(lay: PhaseLayout, dlay: PhaseLayout, tokens: int) -> dict:
    """Item counts per core line of the K/V hand-off (pure arithmetic, shared with the
    estimator). Lines of the two meshes share their first core (both meshes start at the same
    corner of the wafer), so the shorter line is padded with empty cores.

    Returns
    -------
    dict
        ``src_cols``/``dst_cols``: real K/V features per core column of the prefill / decode
        mesh; ``src_rows``/``dst_rows``: prompt tokens per core row; ``rows_per_core``: most
        tokens in a prefill core row; ``feats_per_core``: most real features in a decode column.
    """
    kv = lay.config.kv_size
    fp, fd = lay.kv // lay.px, dlay.kv // dlay.px
    tl = padded(tokens, lay.unit) // lay.py
    return {"src_cols": np.clip(kv - np.arange(lay.px) * fp, 0, fp),
            "dst_cols": np.clip(kv - np.arange(dlay.px) * fd, 0, fd),
            "src_rows": np.clip(tokens - np.arange(lay.py) * tl, 0, tl),
            "dst_rows": balanced_counts(tokens, dlay.py),
            "rows_per_core": min(tl, tokens), "feats_per_core": min(fd, kv)}


def _line_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    n = max(len(a), len(b))
    return np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))


def weight_switch_cost(lay: PhaseLayout, dlay: PhaseLayout) -> Cost:
    """Wafer cost of re-placing the weights from prefill tiles to decode tiles at the switch.

    The emulator keeps both placements; the wafer holds one and reshuffles it over the NoC
    (paper section 4.4). Every element walks from its prefill core to its decode core, all at
    once: about half of them cross each bisection of the mesh, in both directions, so the
    busiest link of the narrower cut carries ``W / (4 * side)`` words of the ``W`` in all; the
    longest walk is corner to corner. Bandwidth-bound, so routing stages are not charged.
    """
    per_core = sum(weight_words_per_core(decode_tile_shapes(dlay)).values())
    total = per_core * dlay.py * dlay.px
    rows, cols = max(lay.py, dlay.py), max(lay.px, dlay.px)
    return Cost(words=total / (4 * min(rows, cols)), hops=rows + cols - 2, routes=2)


def record_handoff(led, lay: PhaseLayout, dlay: PhaseLayout, tokens: int,
                   allreduce: AllreduceSpec = KTREE) -> None:
    """Write the wafer cost of the weight, K/V and hidden-state hand-offs into ``led``."""
    led.charge("handoff/weights", weight_switch_cost(lay, dlay))
    plan = handoff_plan(lay, dlay, tokens)
    per_item = 2 * lay.config.num_layers
    for name, src, dst, words in (
            ("handoff/kv/x", plan["src_cols"], plan["dst_cols"], plan["rows_per_core"]),
            ("handoff/kv/y", plan["src_rows"], plan["dst_rows"], plan["feats_per_core"])):
        led.charge(name, move_cost(*_line_pair(src, dst), words * per_item))
    allreduce.charge(led, max(lay.px, dlay.px), lay.hidden, "handoff/hidden/gather")
    row = (tokens - 1) // (padded(tokens, lay.unit) // lay.py)
    led.charge("handoff/hidden/broadcast", broadcast_cost(max(lay.py, dlay.py), row, lay.hidden))


class MeshPrefiller:
    """The model's prefill path on one fabric.

    Parameters
    ----------
    fab : Fabric
        The prefill mesh (same rank grid as the decode mesh).
    lay : PhaseLayout
        Feature placement on ``fab``'s virtual mesh.
    layers : list of dict
        Per layer, this rank's blocks of :func:`llm.prefill_weights.prefill_layer_tiles`.
    glob : dict
        This rank's blocks of :func:`llm.prefill_weights.prefill_global_tiles`.
    allreduce : AllreduceSpec
        Allreduce of the RMSNorm and softmax reductions along x (K-tree by default).
    """

    def __init__(self, fab: Fabric, lay: PhaseLayout, layers: list, glob: dict,
                 allreduce: AllreduceSpec = KTREE):
        self.fab, self.lay, self.layers, self.glob = fab, lay, layers, glob
        self.spec = allreduce
        c = lay.config
        self.g = c.group_size
        self.scale = np.float32(c.head_dim ** -0.5)
        blocks = [b for w in layers for b in w.values()] + list(glob.values())
        self.weight_words = sum(b.size for b in blocks) // (fab.by * fab.bx)

    # -- pieces ----------------------------------------------------------------------------
    def embed(self, ids: np.ndarray, tl: int) -> np.ndarray:
        """Embedding rows of the prompt fetched along y: ``f32[by, bx, T/Py, H/Px]``."""
        table = self.glob["embed"]                               # f32[by, bx, V/Py, H/Px]
        vr = table.shape[2]
        t = np.arange(ids.size)
        self.fab.ledger.io(4 * ids.size, 1)                      # the token ids enter the wafer
        return fetch_rows(self.fab, table, Y, ids // vr, ids % vr, t // tl, t % tl, tl,
                          name="embed")

    def rmsnorm(self, x: np.ndarray, gamma: np.ndarray, name: str) -> np.ndarray:
        """HF RMSNorm of every token row: ``x * rsqrt(mean(x^2) + eps) * gamma``."""
        c = self.lay.config
        led = self.fab.ledger
        rows, hl = x.shape[2], x.shape[3]
        ss = np.einsum("abti,abti->abt", x, x)                   # f32[by, bx, T/Py]
        led.record(f"{name}/sumsq", macs=rows * hl)
        ss = allreduce(self.fab, ss, X, "sum", self.spec, name=name)
        inv = np.float32(1) / np.sqrt(ss / np.float32(c.hidden_size) + np.float32(c.rms_norm_eps))
        led.record(f"{name}/scale", macs=2 * rows * hl)
        return (x * inv[..., None].astype(np.float32)) * gamma[:, :, None, :]

    def rope(self, i: int, q: np.ndarray, k: np.ndarray) -> tuple:
        """Rotate q ``f32[by, bx, T/Py, q/Px]`` and k ``f32[by, bx, T/Py, kv/Px]`` at the
        absolute positions of the local token rows."""
        fab = self.fab
        by, bx, tl, tk = k.shape
        pos = (fab.index(Y)[:, None] * tl + np.arange(tl)[None, :]).astype(np.float32)
        angle = pos[:, None, :, None] * self.glob["rope_freq"][:, :, None, :]   # [by,bx,tl,tk]
        cos, sin = np.cos(angle), np.sin(angle)
        q = rope_pairs(q.reshape(by, bx, tl, tk, self.g), cos, sin).reshape(q.shape)
        k = rope_pairs(k[..., None], cos, sin)[..., 0]
        fab.ledger.record(f"layer{i}/rope", macs=2 * tl * tk * (self.g + 1))
        return q, k

    def attention(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray,
                  n_tokens: int) -> np.ndarray:
        """Causal attention of all heads; q ``f32[by, bx, T/Py, q/Px]``, k, v
        ``f32[by, bx, T/Py, kv/Px]``. Returns ``f32[by, bx, T/Py, q/Px]`` in q order."""
        fab, led, g = self.fab, self.fab.ledger, self.g
        heads = self.glob["kv_head"]                             # f32[by, bx, kv/Px, n_kv]
        by, bx, tl, tk = k.shape
        nkv = heads.shape[-1]
        # rows (t, g), columns kv features: local column slicing of q, no data movement
        qr = q.reshape(by, bx, tl, tk, g).transpose(0, 1, 2, 4, 3).reshape(by, bx, tl * g, tk)
        s = grouped_gemm_t(fab, qr, k, heads, name=f"layer{i}/scores")  # [by,bx,tl*g,S/Px,nkv]
        sl = s.shape[3]
        s = s.reshape(by, bx, tl, g, sl, nkv) * self.scale
        t_glob = fab.index(Y)[:, None] * tl + np.arange(tl)[None, :]        # [by, tl]
        s_glob = fab.index(X)[:, None] * sl + np.arange(sl)[None, :]        # [bx, S/Px]
        valid = ((s_glob[None, :, None, :] <= t_glob[:, None, :, None])
                 & (s_glob < n_tokens)[None, :, None, :])[:, :, :, None, :, None]
        s = np.where(valid, s, np.float32(-np.inf))
        m = allreduce(fab, s.max(axis=4), X, "max", self.spec, name=f"layer{i}/softmax_max")
        e = np.where(valid, np.exp(s - m[:, :, :, :, None, :]), np.float32(0))
        z = allreduce(fab, e.sum(axis=4), X, "sum", self.spec, name=f"layer{i}/softmax_sum")
        p = e / z[:, :, :, :, None, :]
        led.record(f"layer{i}/softmax", macs=4 * tl * sl * g * nkv)
        o = grouped_meshgemm(fab, p.reshape(by, bx, tl * g, sl, nkv), v, heads,
                             b_preskewed=False, name=f"layer{i}/pv")   # [by, bx, tl*g, kv/Px]
        return o.reshape(by, bx, tl, g, tk).transpose(0, 1, 2, 4, 3).reshape(by, bx, tl, tk * g)

    def layer(self, i: int, x: np.ndarray, n_tokens: int) -> tuple:
        """One decoder block; returns ``(x, k, v)`` with this layer's K (rotated) and V."""
        fab, w = self.fab, self.layers[i]
        h = self.rmsnorm(x, w["attn_norm"], f"layer{i}/attn_norm")
        qkv = meshgemm(fab, h, w["qkv"], name=f"layer{i}/qkv")    # per core q | k | v
        if "qkv_bias" in w:
            qkv = qkv + w["qkv_bias"][:, :, None, :]
        tq, tk = self.lay.q // self.lay.px, self.lay.kv // self.lay.px
        q, k, v = qkv[..., :tq], qkv[..., tq:tq + tk], qkv[..., tq + tk:]
        q, k = self.rope(i, q, k)
        a = self.attention(i, q, k, np.ascontiguousarray(v), n_tokens)
        o = meshgemm(fab, a, w["o"], name=f"layer{i}/o")
        if "o_bias" in w:
            o = o + w["o_bias"][:, :, None, :]
        x = x + o
        h = self.rmsnorm(x, w["mlp_norm"], f"layer{i}/mlp_norm")
        gu = meshgemm(fab, h, w["gate_up"], name=f"layer{i}/gate_up")   # per core gate | up
        if "gate_up_bias" in w:
            gu = gu + w["gate_up_bias"][:, :, None, :]
        tf = gu.shape[-1] // 2
        act = silu(gu[..., :tf]) * gu[..., tf:]
        fab.ledger.record(f"layer{i}/swiglu", macs=4 * act.shape[2] * tf)
        d = meshgemm(fab, act, w["down"], name=f"layer{i}/down")
        if "down_bias" in w:
            d = d + w["down_bias"][:, :, None, :]
        return x + d, k, v

    # -- the hand-off ----------------------------------------------------------------------
    def handoff_kv(self, ks: list, vs: list, n_tokens: int, decoder) -> None:
        """Move every layer's K/V (``f32[by, bx, T/Py, kv/Px]`` here) into ``decoder.cache``.

        Per rank: real K/V features move along x to the decode columns' ranges
        (:func:`~meshrt.relayout.rebalance`), then real tokens along y to the decode rows'
        balanced counts; then each rank cuts its share into decode cores and loads the cache.
        """
        fab, dfab, dlay = self.fab, decoder.fab, decoder.lay
        lay = fab.layout
        if (lay.ry, lay.rx) != (dfab.layout.ry, dfab.layout.rx):
            raise MeshError(f"prefill ranks {lay.ry}x{lay.rx} and decode ranks "
                            f"{dfab.layout.ry}x{dfab.layout.rx} differ")
        plan = handoff_plan(self.lay, dlay, n_tokens)
        nl2 = 2 * len(ks)
        by, bx, tl, fp = ks[0].shape
        data = np.stack(ks + vs)                                 # [2L, by, bx, T/Py, kv/Px]
        data = data.transpose(0, 1, 3, 2, 4).reshape(nl2, by * tl, bx * fp)  # rank's rows x feats
        ry, rx = fab.coords
        src = rank_bounds(plan["src_cols"], lay.rx)
        dst = rank_bounds(plan["dst_cols"], lay.rx)
        data = rebalance(fab, data[:, :, :src[rx + 1] - src[rx]], X, 2, src, dst,
                         name="handoff/kv")
        src = rank_bounds(plan["src_rows"], lay.ry)
        dst = rank_bounds(plan["dst_rows"], lay.ry)
        data = rebalance(fab, data[:, :src[ry + 1] - src[ry]], Y, 1, src, dst,
                         name="handoff/kv")
        # cut into decode cores: [2L, tokens of this rank, bx_d, kv_d/Px_d]
        fd = dlay.kv // dlay.px
        full = np.zeros((nl2, data.shape[1], dfab.bx * fd), np.float32)
        full[:, :, :data.shape[2]] = data
        full = full.reshape(nl2, data.shape[1], dfab.bx, fd)
        counts = plan["dst_rows"]
        cache = decoder.cache
        cache.set_counts(counts)
        bounds = np.concatenate([[0], np.cumsum(counts[dfab.index(Y)])])
        for layer in range(len(ks)):
            cut = [[full[j, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
                   for j in (layer, len(ks) + layer)]
            cache.load(layer, *cut)

    def handoff_hidden(self, x: np.ndarray, n_tokens: int, decoder) -> np.ndarray:
        """The last token's hidden state as a decode Y-vector ``f32[by_d, bx_d, H_d/Py_d]``.

        The core row holding it writes its segments into a zero-filled full-length vector; a
        sum along x completes the vector on that row and a broadcast along y gives it to every
        core, so every decode core takes its segment locally.
        """
        fab, dfab, dlay = self.fab, decoder.fab, decoder.lay
        by, bx, tl, hl = x.shape
        row, slot = divmod(n_tokens - 1, tl)
        full = np.zeros((by, bx, self.lay.px, hl), np.float32)
        mine = np.flatnonzero(fab.index(Y) == row)
        if mine.size:
            full[mine[0], np.arange(bx), fab.index(X), :] = x[mine[0], :, slot, :]
        full = full.reshape(by, bx, self.lay.px * hl)
        full = allreduce(fab, full, X, "sum", self.spec, record=False,
                         name="handoff/hidden/gather")
        full = broadcast(fab, full, Y, row, record=False, name="handoff/hidden/broadcast")
        h = self.lay.config.hidden_size
        vec = np.zeros(dlay.hidden, np.float32)
        vec[:h] = full[0, 0, :h]
        seg = vec.reshape(dlay.py, dlay.hidden // dlay.py)[dfab.index(Y)]   # [by_d, H_d/Py_d]
        return np.ascontiguousarray(np.broadcast_to(seg[:, None], (dfab.by, dfab.bx, seg.shape[1])))

    def prompt_logits(self, x: np.ndarray, n_tokens: int) -> np.ndarray:
        """Logits of every prompt token (final norm and LM head with MeshGEMM on this mesh),
        gathered on every rank (control plane): ``f32[T, vocab]``."""
        h = self.rmsnorm(x, self.glob["final_norm"], "final_norm")
        out = meshgemm(self.fab, h, self.glob["lm_head"], name="lm_head")   # [by,bx,T/Py,V/Px]
        return darray.gather_matrix(self.fab, out, (n_tokens, self.lay.config.vocab_size),
                                    to_all=True)

    # -- the whole prompt ------------------------------------------------------------------
    def run(self, ids, decoder, all_logits: bool = False):
        """Prefill ``ids`` and hand the result to ``decoder``.

        Leaves ``decoder.cache`` holding the prompt's K/V (balanced over the decode rows).

        Returns
        -------
        ndarray or (ndarray, ndarray)
            The last token's logits as a decode X-vector ``f32[by_d, bx_d, V/Px_d]``; with
            ``all_logits`` also every prompt token's logits ``f32[T, vocab]`` on every rank.
        """
        ids = np.asarray([int(t) for t in ids], dtype=np.int64)
        n = ids.size
        c = self.lay.config
        if n == 0:
            raise ValueError("empty prompt")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(f"token ids must be in 0..{c.vocab_size - 1}")
        need = int(balanced_counts(n, decoder.lay.py).max())
        if need > decoder.cache.capacity:
            raise ContextFullError(f"prompt of {n} tokens needs {need} KV slots per decode core; "
                                   f"capacity is {decoder.cache.capacity}")
        tl = padded(n, self.lay.unit) // self.lay.py
        led = self.fab.ledger
        led.memory("prefill/resident", self.weight_words + tl * self.lay.hidden // self.lay.px
                   + 2 * c.num_layers * tl * self.lay.kv // self.lay.px)
        x = self.embed(ids, tl)
        ks, vs = [], []
        for i in range(len(self.layers)):
            x, k, v = self.layer(i, x, n)
            ks.append(k)
            vs.append(v)
        self.handoff_kv(ks, vs, n, decoder)
        h = self.handoff_hidden(x, n, decoder)
        record_handoff(led, self.lay, decoder.lay, n, self.spec)
        logits = decoder.logits(h)
        if all_logits:
            return logits, self.prompt_logits(x, n)
        return logits

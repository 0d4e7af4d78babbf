"""One decode step of the model on the mesh: MeshGEMV, Y/X-vector alternation, no transposes.

Layouts (see :mod:`meshrt.ops.gemv`): ``Y`` = ``f32[by, bx, seg]`` holding segment ``py``,
replicated along x; ``X`` = holding segment ``px``, replicated along y. Per layer::

    x (Y) -> RMSNorm (allreduce y) -> q|k|v = GEMV (X) -> RoPE -> KV append (shift)
          -> scores (allreduce x) -> softmax over the sequence (allreduce y: max, sum)
          -> p.V (allreduce y, X) -> o = GEMV (Y) -> residual
          -> RMSNorm -> gate|up = GEMV (X) -> SwiGLU -> down = GEMV (Y) -> residual

Attention runs for all heads at once: thanks to the feature layout (:mod:`llm.layout`) the
query features on a core are exactly the ``G`` heads that share the core's K/V features, so
per-head partial scores form locally and a single reduction along x completes them.
"""
from __future__ import annotations

import numpy as np

from meshrt.collectives import KTREE, AllreduceSpec, allreduce, broadcast
from meshrt.fabric import Fabric
from meshrt.mesh import X, Y
from meshrt.ops.gemv import meshgemv

from .kvcache import KVCache
from .layout import PhaseLayout


def rope_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate adjacent feature pairs ``(2i, 2i+1)`` along axis ``-2`` of ``x[..., F, G]``."""
    pairs = x.reshape(x.shape[:-2] + (x.shape[-2] // 2, 2, x.shape[-1]))
    c = cos.reshape(cos.shape[:-1] + (cos.shape[-1] // 2, 2))[..., 0, None]
    s = sin.reshape(sin.shape[:-1] + (sin.shape[-1] // 2, 2))[..., 0, None]
    even, odd = pairs[..., 0, :], pairs[..., 1, :]
    out = np.stack([even * c - odd * s, odd * c + even * s], axis=-2)
    return out.reshape(x.shape)


class MeshDecoder:
    """The model's decode path on one fabric.

    Parameters
    ----------
    fab : Fabric
    lay : PhaseLayout
        Feature placement on ``fab``'s virtual mesh.
    layers : list of dict
        Per layer, this rank's blocks of :func:`llm.mesh_weights.decode_layer_tiles`.
    glob : dict
        This rank's blocks of :func:`llm.mesh_weights.decode_global_tiles`.
    cache : KVCache
    allreduce : AllreduceSpec
        Allreduce used by every GEMV and reduction (MeshGEMV's K-tree by default).
    """

    def __init__(self, fab: Fabric, lay: PhaseLayout, layers: list, glob: dict, cache: KVCache,
                 allreduce: AllreduceSpec = KTREE):
        self.fab, self.lay, self.layers, self.glob, self.cache = fab, lay, layers, glob, cache
        self.spec = allreduce
        c = lay.config
        self.g = c.group_size
        self.scale = np.float32(c.head_dim ** -0.5)
        self.vocab_seg = lay.vocab // lay.px
        self.vocab_index = (fab.index(X)[:, None] * self.vocab_seg
                            + np.arange(self.vocab_seg)[None, :])       # int[bx, V/Px]

    # -- pieces ----------------------------------------------------------------------------
    def _allreduce(self, a, axis, op="sum", name="allreduce", words=None):
        """Allreduce of ``a`` along ``axis``; ``words`` overrides the priced vector length (the
        emulator reduces whole fixed-size buffers, the wafer only their filled part)."""
        if words is None:
            return allreduce(self.fab, a, axis, op, self.spec, name=name)
        out = allreduce(self.fab, a, axis, op, self.spec, record=False, name=name)
        self.spec.charge(self.fab.ledger, self.fab.layout.cores(axis), words, name)
        return out

    def _gemv(self, x, w, input_axis, name):
        return meshgemv(self.fab, x, w, input_axis, self.spec, name=name)

    def embed(self, token: int) -> np.ndarray:
        """Embedding row of ``token`` as a Y-vector ``f32[by, bx, H/Py]``."""
        col, row = divmod(int(token), self.vocab_seg)
        e = self.glob["embed"]                                   # f32[by, bx, V/Px, H/Py]
        mine = e[:, :, row, :]
        self.fab.ledger.io(4, 1)                                 # the token id enters the wafer
        return broadcast(self.fab, mine, X, col, name="embed")

    def rmsnorm(self, x: np.ndarray, gamma: np.ndarray, name: str) -> np.ndarray:
        """HF RMSNorm of a Y-vector: ``x * rsqrt(mean(x^2) + eps) * gamma``."""
        ss = np.einsum("abi,abi->ab", x, x)[..., None]           # f32[by, bx, 1]
        ss = self._allreduce(ss, Y, name=name)
        inv = 1.0 / np.sqrt(ss / np.float32(self.lay.config.hidden_size)
                            + np.float32(self.lay.config.rms_norm_eps))
        self.fab.ledger.record(name + "/scale", macs=2 * x.shape[-1])
        return (x * inv.astype(np.float32)) * gamma

    def attention(self, i: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Attention of this token over layer ``i``'s cache; q ``f32[by, bx, q/Px]`` (X),
        k, v ``f32[by, bx, kv/Px]`` (X). Returns the attention output as an X-vector."""
        fab, cache = self.fab, self.cache
        heads = self.glob["kv_head"]                             # f32[by, bx, kv/Px, nkv]
        tk = k.shape[-1]
        nkv = heads.shape[-1]
        cache.append(i, k, v)
        kc, vc = cache.k[i], cache.v[i]                          # f32[by, bx, cap, kv/Px]
        qh = q.reshape(q.shape[:2] + (tk, 1, self.g)) * heads[..., None]   # [by,bx,tk,nkv,G]
        part = np.matmul(kc, qh.reshape(q.shape[:2] + (tk, nkv * self.g)))  # [by,bx,cap,nq]
        fill = cache.max_fill        # the wafer works on filled slots only: the fullest row
        fab.ledger.record(f"layer{i}/scores/local", macs=fill * tk * self.g)
        scores = self._allreduce(part, X, name=f"layer{i}/scores", words=fill * nkv * self.g)
        scores = scores * self.scale
        valid = cache.valid()                                    # bool[by, 1, cap, 1]
        scores = np.where(valid, scores, -np.inf)
        m = self._allreduce(scores.max(axis=2, keepdims=True), Y, "max", f"layer{i}/softmax_max")
        e = np.where(valid, np.exp(scores - m), 0).astype(np.float32)
        s = self._allreduce(e.sum(axis=2, keepdims=True), Y, name=f"layer{i}/softmax_sum")
        p = e / s                                                # f32[by, bx, cap, nq]
        fab.ledger.record(f"layer{i}/softmax", macs=3 * fill * nkv * self.g)
        w = np.matmul(np.swapaxes(vc, 2, 3), p)                  # f32[by, bx, kv/Px, nq]
        o = (w.reshape(w.shape[:3] + (nkv, self.g)) * heads[..., None]).sum(axis=3)
        fab.ledger.record(f"layer{i}/pv/local", macs=fill * tk * self.g)
        return self._allreduce(o.reshape(o.shape[:2] + (-1,)), Y, name=f"layer{i}/pv")

    def layer(self, i: int, x: np.ndarray, pos: int) -> np.ndarray:
        w = self.layers[i]
        h = self.rmsnorm(x, w["attn_norm"], f"layer{i}/attn_norm")
        qkv = self._gemv(h, w["qkv"], "y", f"layer{i}/qkv")      # X: q | k | v per core
        if "qkv_bias" in w:
            qkv = qkv + w["qkv_bias"]
        tq = self.lay.q // self.lay.px
        tk = self.lay.kv // self.lay.px
        q, k, v = qkv[..., :tq], qkv[..., tq:tq + tk], qkv[..., tq + tk:]
        angle = np.float32(pos) * self.glob["rope_freq"]         # f32[by, bx, kv/Px]
        cos, sin = np.cos(angle), np.sin(angle)
        q = rope_pairs(q.reshape(q.shape[:2] + (tk, self.g)), cos, sin).reshape(q.shape)
        k = rope_pairs(k[..., None], cos, sin)[..., 0]
        a = self.attention(i, q, k, v)
        o = self._gemv(a, w["o"], "x", f"layer{i}/o")            # Y
        if "o_bias" in w:
            o = o + w["o_bias"]
        x = x + o
        h = self.rmsnorm(x, w["mlp_norm"], f"layer{i}/mlp_norm")
        gu = self._gemv(h, w["gate_up"], "y", f"layer{i}/gate_up")   # X: gate | up per core
        if "gate_up_bias" in w:
            gu = gu + w["gate_up_bias"]
        tf = gu.shape[-1] // 2
        g, u = gu[..., :tf], gu[..., tf:]
        act = g / (np.float32(1) + np.exp(-g)) * u               # SwiGLU
        self.fab.ledger.record(f"layer{i}/swiglu", macs=4 * tf)
        d = self._gemv(act, w["down"], "x", f"layer{i}/down")    # Y
        if "down_bias" in w:
            d = d + w["down_bias"]
        return x + d

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Final norm and LM head: logits as an X-vector ``f32[by, bx, V/Px]`` (padding -inf)."""
        h = self.rmsnorm(x, self.glob["final_norm"], "final_norm")
        if "lm_head" in self.glob:
            out = self._gemv(h, self.glob["lm_head"], "y", "lm_head")
        else:  # tied: the embedding tiles E[v-seg px, h-seg py], used transposed per tile
            out = self._gemv(h, np.swapaxes(self.glob["embed"], 2, 3), "y", "lm_head")
        real = self.vocab_index < self.lay.config.vocab_size
        return np.where(real[None], out, -np.inf).astype(np.float32)

    def step(self, token: int, pos: int) -> np.ndarray:
        """Run ``token`` at position ``pos``; returns its logits (X-vector)."""
        self.cache.begin_token()
        x = self.embed(token)
        for i in range(len(self.layers)):
            x = self.layer(i, x, pos)
        self.cache.end_token()
        return self.logits(x)

    # -- picking the next token -----------------------------------------------------------
    def argmax(self, logits: np.ndarray) -> int:
        """Greedy token on the mesh: max along x, then the lowest index holding it."""
        local = logits.max(axis=-1, keepdims=True)
        best = self._allreduce(local, X, "max", "argmax/value")
        idx = np.where(logits == best, self.vocab_index[None], np.iinfo(np.int64).max)
        neg = -idx.min(axis=-1, keepdims=True).astype(np.float64)
        tok = -self._allreduce(neg, X, "max", "argmax/index")
        self.fab.ledger.io(4, 1)                                 # the token leaves the wafer
        return int(tok.reshape(-1)[0])

    def gather_logits(self, logits: np.ndarray) -> np.ndarray:
        """All ``vocab_size`` logits on every rank (control plane, for sampling and tests)."""
        from meshrt import darray
        from meshrt.ops.gemv import vector_from_tiles
        tiles = darray.gather(self.fab, logits, to_all=True)
        return vector_from_tiles(tiles, self.lay.config.vocab_size, "x")

"""One decode step of the model on the mesh: MeshGEMV, Y/X-vector alternation, no transposes.

The engine executes the decode program of :mod:`llm.engine.program` (the same op list the estimator
prices): one handler per op kind, activations in a dict, data through the fabric.

Layouts (see :mod:`meshrt.ops.gemv`): ``Y`` = ``f32[by, bx, seg]`` holding segment ``py``,
replicated along x; ``X`` = holding segment ``px``, replicated along y. Per layer::

    x (Y) -> RMSNorm (allreduce y) -> q|k|v = GEMV (X) -> RoPE -> KV append (shift)
          -> scores (allreduce x) -> softmax over the sequence (allreduce y: max, sum)
          -> p.V (allreduce y, X) -> o = GEMV (Y) -> residual
          -> RMSNorm -> gate|up = GEMV (X) -> SwiGLU -> down = GEMV (Y) -> residual

Attention runs for all heads at once: thanks to the feature layout (:mod:`llm.placement.layout`) the
query features on a core are exactly the ``G`` heads that share the core's K/V features, so
per-head partial scores form locally and a single reduction along x completes them.

A batch of ``B`` sequences decodes in one step (:meth:`MeshDecoder.step_batch`): every vector
gains a batch axis (``f32[by, bx, B, seg]``), each GEMV multiplies ``B`` right-hand vectors and
its K-tree carries ``B`` words per message; each sequence has its own KV cache (all of one
capacity), and attention reads each sequence's cache only. One sequence runs :meth:`step`.

The kernels and collectives only compute here (``record=False``); each program's records are
written from its shapes by :mod:`llm.engine.kinds` (:meth:`MeshDecoder.execute`), the layers'
once for all layers (:func:`~llm.engine.kinds.charge_layers`), exactly as the estimator writes
them.

Every step checks its logits: if any is not finite, :class:`NonFiniteError` names the first
layer whose output held a non-finite value (each layer's output is checked as it is produced;
a few element tests per core, against the layer's GEMVs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from meshrt.collectives import KTREE, AllreduceSpec, allreduce, broadcast
from meshrt.fabric import Fabric
from meshrt.mesh import X
from meshrt.ops.gemv import meshgemv
from meshrt.precision import widen

from ..modeling import functional as F
from ..placement.layout import PhaseLayout
from . import program as P
from .kinds import Site, charge, charge_layers
from .kvcache import KVCache


class NonFiniteError(FloatingPointError):
    """A decode step produced non-finite logits."""


class MeshDecoder:
    """The model's decode path on one fabric.

    Parameters
    ----------
    fab : Fabric
    lay : PhaseLayout
        Feature placement on ``fab``'s virtual mesh.
    layers : list of dict
        Per layer, this rank's blocks of the ``layer{i}/...`` tensors of
        :func:`llm.placement.decode_tiles.decode_specs` (keys without the prefix).
    glob : dict
        This rank's blocks of the global tensors of :func:`llm.placement.decode_tiles.decode_specs`.
    cache : KVCache
    allreduce : AllreduceSpec
        Allreduce used by every GEMV and reduction (MeshGEMV's K-tree by default).
    """

    def __init__(
        self,
        fab: Fabric,
        lay: PhaseLayout,
        layers: list,
        glob: dict,
        cache: KVCache,
        allreduce: AllreduceSpec = KTREE,
    ):
        self.fab, self.lay, self.layers, self.cache = fab, lay, layers, cache
        self.spec = allreduce
        self.glob = dict(glob)
        if "lm_head" not in self.glob:  # tied: the embedding tiles E[v-seg px, h-seg py], used
            self.glob["lm_head"] = np.swapaxes(self.glob["embed"], 2, 3)  # transposed per tile
        c = lay.config
        self.g = c.group_size
        self.scale = np.float32(c.head_dim**-0.5)
        self.vocab_seg = lay.vocab // lay.px
        self.vocab_index = (
            fab.index(X)[:, None] * self.vocab_seg + np.arange(self.vocab_seg)[None, :]
        )  # int[bx, V/Px]
        self.real_vocab = self.vocab_index < c.vocab_size  # bool[bx, V/Px]
        self.heads = HeadPlan(self.glob["kv_head"], self.g)
        self.head_ops, self.layer_ops = P.decode_head(lay), P.decode_layer(lay)
        self.logit_ops, self.pick_ops = P.decode_logits(lay), P.decode_pick(lay)
        self._batch_ops: dict[int, tuple] = {}  # B -> (layer, logits, pick) programs of B vectors
        self._caches: list[KVCache] | None = None  # the sequences of the running batch step
        self.tq, self.tk = lay.q // lay.px, lay.kv // lay.px
        assert self.tq == self.tk * self.g  # a core's query heads sit on its K/V features
        self.rope_angle, self.rope_partner, self.rope_sign = F.rope_plan(self.tk, self.g)
        self._rope_at: tuple | None = None  # (position, cos, sin) of the token being run
        self._plans: dict[int, tuple] = {}  # id(op list) -> (op list, its executor steps)
        self.handlers: dict[str, Callable[..., Any]] = {
            "embed_broadcast": self._embed,
            "norm": self._norm,
            "gemv": self._gemv,
            "rope": self._rope,
            "kv_append": self._kv_append,
            "cache_scores": self._scores,
            "softmax": self._softmax,
            "cache_pv": self._pv,
            "add": self._add,
            "swiglu": self._swiglu,
            "vocab_mask": self._vocab_mask,
            "argmax": self._argmax,
        }

    # -- the executor ----------------------------------------------------------------------
    def execute(
        self, ops: list, acts: dict, weights: dict, run: P.Pass, priced: bool = True
    ) -> dict:
        """Run ``ops`` on the activations ``acts`` (updated in place and returned), then
        (``priced``) write their records into the ledger."""
        plan = self._plans.get(id(ops))
        if plan is None or plan[0] is not ops:  # once per op list: handlers and names looked up
            steps = tuple(
                (self.handlers[op.kind], op, op.inputs, op.outputs, len(op.outputs)) for op in ops
            )
            plan = self._plans[id(ops)] = (ops, steps)
        with self.fab.ledger.sealed("the decode program"):  # kernels compute, kinds price
            for handler, op, inputs, outputs, n_out in plan[1]:
                out = handler(op, weights, run, *[acts[k] for k in inputs])
                if n_out == 1:
                    acts[outputs[0]] = out
                elif n_out:
                    acts.update(zip(outputs, out))
        if priced:
            charge(ops, self.fab.ledger, Site(self.lay, self.spec, run))
        return acts

    def _pass(self, token: int) -> P.Pass:
        c = self.cache
        return P.Pass(
            fill=c.max_fill,
            shifts=c.shifting,
            capacity=c.capacity,
            token_col=int(token) // self.vocab_seg,
        )

    # -- op handlers -----------------------------------------------------------------------
    def _allreduce(self, a, axis, op="sum", name="allreduce"):
        """Allreduce of ``a`` along ``axis`` (the wafer's figures: :mod:`llm.engine.kinds`)."""
        return allreduce(self.fab, a, axis, op, self.spec, record=False, name=name)

    def _embed(self, op, w, run):
        """Embedding row of the token as a Y-vector ``f32[by, bx, H/Py]`` (a batch: each
        sequence's row multicast from its own column, ``f32[by, bx, B, H/Py]``)."""
        e = w[op.weight]  # [by, bx, V/Px, H/Py]
        if self._caches is not None:
            rows = []
            for token, col in zip(self._tokens, run.token_cols):
                mine = np.zeros((self.fab.by, self.fab.bx, e.shape[3]), np.float32)
                j = col - self.fab.origin[X]
                if 0 <= j < self.fab.bx:
                    mine[:, j] = widen(e[:, j, token % self.vocab_seg, :])
                rows.append(broadcast(self.fab, mine, op.axis, col, False, op.name))
            return np.stack(rows, 2)
        mine = np.zeros((self.fab.by, self.fab.bx, e.shape[3]), np.float32)
        j = run.token_col - self.fab.origin[X]
        if 0 <= j < self.fab.bx:  # only the core column holding the token reads its table
            mine[:, j] = widen(e[:, j, self._token % self.vocab_seg, :])
        return broadcast(self.fab, mine, op.axis, run.token_col, False, op.name)

    def _norm(self, op, w, run, x):
        """HF RMSNorm of a Y-vector: ``x * rsqrt(mean(x^2) + eps) * gamma``."""
        c = self.lay.config
        gamma = w[op.weight]
        if x.ndim == 3:
            ss = np.einsum("abi,abi->ab", x, x)[..., None]  # f32[by, bx, 1]
        else:  # B vectors: f32[by, bx, B, 1]
            ss, gamma = np.einsum("abki,abki->abk", x, x)[..., None], gamma[:, :, None]
        ss = self._allreduce(ss, op.axis, name=f"{op.name}/allreduce")
        inv = F.rms_inverse(ss / np.float32(c.hidden_size), c.rms_norm_eps)
        return F.rms_scale(x, inv, gamma)

    def _gemv(self, op, w, run, x):
        out = meshgemv(self.fab, x, w[op.weight], op.dims.input_axis, self.spec, op.name, False)
        if op.bias not in w:
            return out
        return out + (w[op.bias] if out.ndim == 3 else w[op.bias][:, :, None])

    def _rope(self, op, w, run, qkv):
        """Split ``q | k | v`` (X-vectors) and rotate q and k at the token's position."""
        tq, tk = self.tq, self.tk
        if self._caches is not None:  # B sequences, each at its own position
            pos = np.asarray(self._positions, np.float32)[:, None]
            angle = pos * self.glob["rope_freq"][:, :, None, :]  # f32[by, bx, B, kv/Px]
            cos, sin = np.cos(angle), np.sin(angle)
            cos, sin = cos[..., self.rope_angle], sin[..., self.rope_angle] * self.rope_sign
            qk = qkv[..., : tq + tk]
            qk = qk * cos + qk[..., self.rope_partner] * sin
            return qk[..., :tq], qk[..., tq:], qkv[..., tq + tk :]
        if self._rope_at is None or self._rope_at[0] != self._pos:  # once per token
            angle = np.float32(self._pos) * self.glob["rope_freq"]  # f32[by, bx, kv/Px]
            cos, sin = np.cos(angle), np.sin(angle)
            sin = sin[..., self.rope_angle] * self.rope_sign
            self._rope_at = (self._pos, cos[..., self.rope_angle], sin)
        _, cos, sin = self._rope_at
        qk = qkv[..., : tq + tk]
        # F.rotate on every pair at once: (a cos - b sin, b cos + a sin), the same products
        qk = qk * cos + qk[..., self.rope_partner] * sin
        return qk[..., :tq], qk[..., tq:], qkv[..., tq + tk :]

    def _kv_append(self, op, w, run, k, v):
        if self._caches is None:
            self.cache.append(self._layer, k, v, name=op.name, memory=False)
        else:  # each sequence into its own cache
            for i, cache in enumerate(self._caches):
                cache.append(self._layer, k[:, :, i], v[:, :, i], name=op.name, memory=False)
        return ()

    def _scores(self, op, w, run, q):
        """``q . K`` over the cache, all heads: f32[by, bx, cap, nq] (invalid slots -inf); a batch:
        each sequence over its own cache, f32[by, bx, B, cap, nq]."""
        if self._caches is not None:
            caches = self._caches
            kc = np.stack([c.k[self._layer] for c in caches], 2)  # f32[by, bx, B, cap, kv/Px]
            part = np.matmul(kc, self.heads.spread_batch(q))  # [by, bx, B, cap, nq]
            s = self._allreduce(part, op.axis, name=f"{op.name}/allreduce")
            valid = np.stack([c.valid() for c in caches], 2)  # bool[by, 1, B, cap, 1]
            return np.where(valid, s * self.scale, -np.inf)
        kc = self.cache.k[self._layer]  # f32[by, bx, cap, kv/Px]
        part = np.matmul(kc, self.heads.spread(q))  # [by,bx,cap,nq]
        s = self._allreduce(part, op.axis, name=f"{op.name}/allreduce")
        return np.where(self.cache.valid(), s * self.scale, -np.inf)

    def _softmax(self, op, w, run, s):
        """Softmax over the sequence (split along y): max and sum allreduced along y."""
        # Invalid slots hold -inf (:meth:`_scores`) and every line has a valid slot, so the max
        # is finite and exp() makes them exactly 0: no mask needed.
        slots = s.ndim - 2  # the cache slots: axis 2, or 3 in a batch
        m = self._allreduce(
            np.maximum.reduce(s, slots, keepdims=True), op.axis, "max", f"{op.name}/max"
        )
        e = F.softmax_numerator(s, m)
        z = self._allreduce(np.add.reduce(e, slots, keepdims=True), op.axis, name=f"{op.name}/sum")
        return F.softmax_normalize(e, z)

    def _pv(self, op, w, run, p):
        """``p . V`` over the cache, all heads: the attention output as an X-vector."""
        if self._caches is not None:
            vc = np.stack([c.v[self._layer] for c in self._caches], 2)
            o = np.matmul(np.swapaxes(vc, 3, 4), p)  # f32[by, bx, B, kv/Px, nq]
            picked = self.heads.pick_batch(o)  # f32[by, bx, B, kv/Px * G]
            return self._allreduce(picked, op.axis, name=f"{op.name}/allreduce")
        vc = self.cache.v[self._layer]
        o = np.matmul(np.swapaxes(vc, 2, 3), p)  # f32[by, bx, kv/Px, nq]
        picked = self.heads.pick(o)  # f32[by, bx, kv/Px * G]
        return self._allreduce(picked, op.axis, name=f"{op.name}/allreduce")

    def _add(self, op, w, run, a, b):
        return a + b

    def _swiglu(self, op, w, run, gu):
        tf = gu.shape[-1] // 2
        return F.swiglu(gu[..., :tf], gu[..., tf:])

    def _vocab_mask(self, op, w, run, logits):
        return np.where(self._real(logits), logits, np.float32(-np.inf))

    def _real(self, logits: np.ndarray) -> np.ndarray:
        """The real-vocabulary mask shaped to broadcast over ``logits`` (one or B vectors)."""
        return self.real_vocab[None] if logits.ndim == 3 else self.real_vocab[None, :, None]

    def _argmax(self, op, w, run, logits):
        """Greedy token on the mesh: max along x, then the lowest index holding it (a batch: a
        list of B tokens, the reductions carrying B words)."""
        local = logits.max(axis=-1, keepdims=True)
        best = self._allreduce(local, op.axis, "max", f"{op.name}/value")
        index = self.vocab_index[None] if logits.ndim == 3 else self.vocab_index[None, :, None]
        idx = np.where(logits == best, index, np.iinfo(np.int64).max)
        neg = -idx.min(axis=-1, keepdims=True).astype(np.float64)
        tok = -self._allreduce(neg, op.axis, "max", f"{op.name}/index")
        if logits.ndim == 3:
            return int(tok.reshape(-1)[0])
        return [int(t) for t in tok[0, 0, :, 0]]

    # -- the step --------------------------------------------------------------------------
    def logits(
        self,
        x: np.ndarray,
        first_bad: int | None = None,
        source: str = "the hidden state handed over from prefill",
    ) -> np.ndarray:
        """Final norm and LM head: logits as an X-vector ``f32[by, bx, V/Px]`` (padding -inf).

        Checked (:meth:`check`): ``first_bad`` is the first layer (on this rank) whose output was
        not finite, ``source`` names where ``x`` comes from when none was.
        """
        ops = self.logit_ops if x.ndim == 3 else self._programs(x.shape[2])[1]
        logits = self.execute(ops, {"x": x}, self.glob, P.Pass())["logits"]
        self.check(logits, first_bad, source)
        return logits

    def _programs(self, batch: int) -> tuple:
        """``(layer, logits, pick)`` programs of ``batch`` vectors (made once per size)."""
        got = self._batch_ops.get(batch)
        if got is None:
            lay = self.lay
            got = self._batch_ops[batch] = (
                P.decode_layer(lay, batch),
                P.decode_logits(lay, batch),
                P.decode_pick(lay, batch),
            )
        return got

    def step(self, token: int, pos: int) -> np.ndarray:
        """Run ``token`` at position ``pos``; returns its logits (X-vector)."""
        self.cache.begin_token()
        self._token, self._pos = int(token), pos
        run = self._pass(token)
        x = self.execute(self.head_ops, {}, self.glob, run)["x"]
        x, first_bad = self._layers(x, run, self.layer_ops)
        self.cache.end_token()
        return self.logits(x, first_bad, f"the embedding of token {token}")

    def step_batch(self, tokens, positions, caches: list) -> np.ndarray:
        """Run ``tokens[i]`` at ``positions[i]`` of the sequence whose cache is ``caches[i]``,
        all in one step; returns their logits, ``f32[by, bx, B, V/Px]``.

        The caches must have one capacity (a sequence's cache is its own; its slots per core
        are the same for all, so one product covers them). The ledger records one step of the
        batch: :func:`llm.cost.estimate.decode_batch_step` prices the same.
        """
        if len({c.capacity for c in caches}) != 1:
            raise ValueError("the caches of a batch need one capacity")
        for c in caches:  # every cache is checked before any bookkeeping moves
            if c.full:
                c.begin_token()  # raises ContextFullError, naming the cache
        for c in caches:
            c.begin_token()
        self._caches, self._tokens = list(caches), [int(t) for t in tokens]
        self._positions = list(positions)
        try:
            run = P.Pass(
                fill=sum(c.max_fill for c in caches),
                shifts=sum(c.shifting for c in caches),
                capacity=sum(c.capacity for c in caches),
                token_cols=tuple(t // self.vocab_seg for t in self._tokens),
            )
            x = self.execute(self.head_ops, {}, self.glob, run)["x"]
            x, first_bad = self._layers(x, run, self._programs(len(caches))[0])
        finally:
            self._caches = None
            for c in caches:
                c.end_token()
        return self.logits(x, first_bad, f"the embeddings of tokens {self._tokens}")

    def _layers(self, x: np.ndarray, run: P.Pass, ops: list) -> tuple:
        """Every layer on ``x``: ``(x, first layer whose output was not finite or None)``;
        their records written once for all (every layer does the same work)."""
        first_bad = None if _finite(x) else -1
        for i in range(len(self.layers)):
            self._layer = i
            x = self.execute(ops, {"x": x}, self.layers[i], run, priced=False)["x"]
            if first_bad is None and not _finite(x):
                first_bad = i
        site = Site(self.lay, self.spec, run)
        charge_layers(ops, len(self.layers), self.fab.ledger, site)
        return x, first_bad

    def check(self, logits: np.ndarray, first_bad: int | None, source: str) -> None:
        """Raise :class:`NonFiniteError` if any real logit is not finite.

        One flag per rank, combined over the ranks (control plane), per step; the message
        names the first layer whose output held a non-finite value on any rank (``-1``: the
        input ``source`` already did; none: the final norm or the LM head made them).
        """
        bad = not np.isfinite(np.where(self._real(logits), logits, 0)).all()
        control = self.fab.control
        bad = control.allreduce_max(bad)
        if not bad:
            return
        layers = len(self.layers)
        first = layers if first_bad is None else first_bad
        first = control.allreduce(first, op="min")
        where = (
            source
            if first < 0
            else f"layer {first}"
            if first < layers
            else "the final norm or the LM head (every layer's output was finite)"
        )
        raise NonFiniteError(f"non-finite logits: non-finite values first appear in {where}")

    # -- picking the next token -----------------------------------------------------------
    def argmax(self, logits: np.ndarray):
        """Greedy token on the mesh: max along x, then the lowest index holding it (logits of
        a batch: a list of tokens)."""
        ops = self.pick_ops if logits.ndim == 3 else self._programs(logits.shape[2])[2]
        return self.execute(ops, {"logits": logits}, self.glob, P.Pass())["token"]

    def gather_logits(self, logits: np.ndarray) -> np.ndarray:
        """All ``vocab_size`` logits on every rank (control plane, for sampling and tests):
        ``f32[vocab]``, or ``f32[B, vocab]`` for a batch."""
        from meshrt import hostio
        from meshrt.ops.gemv import vector_from_tiles

        tiles = hostio.gather(self.fab, logits, to_all=True)
        assert tiles is not None  # to_all: every rank holds them
        return vector_from_tiles(tiles, self.lay.config.vocab_size, "x")


def _finite(x: np.ndarray) -> bool:
    """Whether every element of ``x`` is finite: one sum (non-finite if any element is), the
    element test only when the sum overflowed or is not finite."""
    return math.isfinite(float(x.sum())) or bool(np.isfinite(x).all())


class HeadPlan:
    """Index arrays, made once per layout, that pair a core's query features with the K/V head
    of the cached features they meet.

    A core holds K/V features ``j`` (``kv_head[..., j, :]`` one-hot over the ``nkv`` K/V heads;
    a zero row is padding) and, at ``j * g + h``, the ``g`` query heads that share feature
    ``j``. Scores over the cache are one matmul per core with ``q`` spread to ``[kv/Px,
    nkv * g]`` (feature ``j``'s queries in its head's columns, zeros elsewhere); ``P . V``
    comes back as ``[kv/Px, nkv * g]`` and each feature keeps its own head's columns.

    Parameters
    ----------
    kv_head : ndarray
        ``f32[by, bx, kv/Px, nkv]``, this rank's one-hot head tiles.
    g : int
        Query heads per K/V head.
    """

    def __init__(self, kv_head: np.ndarray, g: int):
        by, bx, tk, nkv = kv_head.shape
        nq = nkv * g
        owned = np.asarray(kv_head.any(axis=-1))  # bool[by, bx, tk]
        head = kv_head.argmax(axis=-1)  # int[by, bx, tk]
        core = np.arange(by * bx).reshape(by, bx, 1, 1)
        j = np.arange(tk).reshape(1, 1, tk, 1)
        slot = (core * tk + j) * nq + head[..., None] * g + np.arange(g)  # [by, bx, tk, g]
        keep = np.broadcast_to(owned[..., None], slot.shape)
        self.shape, self.g = (by, bx, tk, nq), g
        self.padded = not keep.all()
        self.slot = slot[keep]  # flat index in [by, bx, tk, nq] of every query feature kept
        self.kept = np.flatnonzero(keep)  # its flat index in [by, bx, tk * g]
        self._spread = np.zeros(by * bx * tk * nq, np.float32)  # zeros stay where no query is
        # the same indices as (core, index within the core), for B vectors per core
        self._slot_core, self._slot_in = np.divmod(self.slot, tk * nq)
        self._kept_core, self._kept_in = np.divmod(self.kept, tk * g)

    def spread(self, q: np.ndarray) -> np.ndarray:
        """``f32[by, bx, tk * g]`` queries -> ``f32[by, bx, tk, nkv * g]`` (a reused buffer:
        valid until the next call)."""
        flat = q.reshape(-1)
        self._spread[self.slot] = flat[self.kept] if self.padded else flat
        return self._spread.reshape(self.shape)

    def spread_batch(self, q: np.ndarray) -> np.ndarray:
        """:meth:`spread` of ``B`` vectors: ``f32[by, bx, B, tk * g]`` ->
        ``f32[by, bx, B, tk, nkv * g]``."""
        by, bx, tk, nq = self.shape
        b = q.shape[2]
        out = np.zeros((by * bx, b, tk * nq), np.float32)
        src = q.reshape(by * bx, b, tk * self.g)
        out[self._slot_core, :, self._slot_in] = src[self._kept_core, :, self._kept_in]
        return out.reshape(by, bx, b, tk, nq)

    def pick_batch(self, o: np.ndarray) -> np.ndarray:
        """:meth:`pick` of ``B`` vectors: ``f32[by, bx, B, tk, nkv * g]`` ->
        ``f32[by, bx, B, tk * g]``."""
        by, bx, tk, nq = self.shape
        b = o.shape[2]
        out = np.zeros((by * bx, b, tk * self.g), np.float32)
        src = o.reshape(by * bx, b, tk * nq)
        out[self._kept_core, :, self._kept_in] = src[self._slot_core, :, self._slot_in]
        return out.reshape(by, bx, b, tk * self.g)

    def pick(self, o: np.ndarray) -> np.ndarray:
        """``f32[by, bx, tk, nkv * g]`` -> ``f32[by, bx, tk * g]``: each feature's own head
        (0 on padding features)."""
        by, bx = self.shape[:2]
        picked = o.reshape(-1)[self.slot]
        if self.padded:
            out = np.zeros(by * bx * self.shape[2] * self.g, np.float32)
            out[self.kept] = picked
            picked = out
        return picked.reshape(by, bx, -1)

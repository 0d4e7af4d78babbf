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
from .kvcache import KVCache


class NonFiniteError(FloatingPointError):
    """A decode step produced non-finite logits."""


class MeshDecoder:
    """The model's decode path on one fabric.

    Every layer of a token writes the same ledger records under its own ``layer{i}/`` names,
    so layer 0 records them on a :class:`~meshrt.plmr.LedgerTape` and the other layers replay
    it (:attr:`tape_layers`; the figures are the same either way).

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

    #: Price layers 1.. from layer 0's tape; ``False``: every layer prices its own ops.
    tape_layers = True

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
        self._local: dict = {}  # (op name, fill, shifts) -> ((record name, Cost), ...)
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
    def execute(self, ops: list, acts: dict, weights: dict, run: P.Pass) -> dict:
        """Run ``ops`` on the activations ``acts`` (updated in place and returned)."""
        plan = self._plans.get(id(ops))
        if plan is None or plan[0] is not ops:  # once per op list: handlers and names looked up
            steps = tuple(
                (self.handlers[op.kind], op, op.inputs, op.outputs, len(op.outputs)) for op in ops
            )
            plan = self._plans[id(ops)] = (ops, steps)
        for handler, op, inputs, outputs, n_out in plan[1]:
            out = handler(op, weights, run, *[acts[k] for k in inputs])
            if n_out == 1:
                acts[outputs[0]] = out
            elif n_out:
                acts.update(zip(outputs, out))
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
    def _charge_local(self, op, run) -> None:
        """The local work of ``op`` in ``run`` into the ledger (:func:`program.local_costs`,
        computed once per op and cache fill)."""
        if self.fab.ledger.muted:
            return
        key = (op.name, run.fill, run.shifts)
        parts = self._local.get(key)
        if parts is None:
            parts = self._local[key] = P.local_records(op.name, P.local_costs(op, run))
        led = self.fab.ledger
        for name, cost in parts:
            led.charge(name, cost)

    def _allreduce(self, a, axis, op="sum", name="allreduce", words=None):
        """Allreduce of ``a`` along ``axis``; ``words`` overrides the priced vector length (the
        emulator reduces whole fixed-size buffers, the wafer only their filled part)."""
        if words is None:
            return allreduce(self.fab, a, axis, op, self.spec, name=name)
        out = allreduce(self.fab, a, axis, op, self.spec, record=False, name=name)
        if not self.fab.ledger.muted:
            self.spec.charge(self.fab.ledger, self.fab.layout.cores(axis), words, name)
        return out

    def _embed(self, op, w, run):
        """Embedding row of the token as a Y-vector ``f32[by, bx, H/Py]``."""
        e = w[op.weight]  # [by, bx, V/Px, H/Py]
        mine = np.zeros((self.fab.by, self.fab.bx, e.shape[3]), np.float32)
        j = run.token_col - self.fab.origin[X]
        if 0 <= j < self.fab.bx:  # only the core column holding the token reads its table
            mine[:, j] = widen(e[:, j, self._token % self.vocab_seg, :])
        self.fab.ledger.io(4, 1)  # the token id enters the wafer
        return broadcast(self.fab, mine, op.axis, run.token_col, name=op.name)

    def _norm(self, op, w, run, x):
        """HF RMSNorm of a Y-vector: ``x * rsqrt(mean(x^2) + eps) * gamma``."""
        c = self.lay.config
        ss = np.einsum("abi,abi->ab", x, x)[..., None]  # f32[by, bx, 1]
        ss = self._allreduce(ss, op.axis, name=f"{op.name}/allreduce")
        inv = F.rms_inverse(ss / np.float32(c.hidden_size), c.rms_norm_eps)
        self._charge_local(op, run)
        return F.rms_scale(x, inv, w[op.weight])

    def _gemv(self, op, w, run, x):
        out = meshgemv(
            self.fab,
            x,
            w[op.weight],
            op.dims["input_axis"],
            self.spec,
            name=op.name,
            priced=P.gemv_tile(op, (self.lay.py, self.lay.px)),
        )
        return out + w[op.bias] if op.bias in w else out

    def _rope(self, op, w, run, qkv):
        """Split ``q | k | v`` (X-vectors) and rotate q and k at the token's position."""
        tq, tk = self.tq, self.tk
        if self._rope_at is None or self._rope_at[0] != self._pos:  # once per token
            angle = np.float32(self._pos) * self.glob["rope_freq"]  # f32[by, bx, kv/Px]
            cos, sin = np.cos(angle), np.sin(angle)
            sin = sin[..., self.rope_angle] * self.rope_sign
            self._rope_at = (self._pos, cos[..., self.rope_angle], sin)
        _, cos, sin = self._rope_at
        qk = qkv[..., : tq + tk]
        # F.rotate on every pair at once: (a cos - b sin, b cos + a sin), the same products
        qk = qk * cos + qk[..., self.rope_partner] * sin
        self._charge_local(op, run)
        return qk[..., :tq], qk[..., tq:], qkv[..., tq + tk :]

    def _kv_append(self, op, w, run, k, v):
        self.cache.append(self._layer, k, v, name=op.name)
        self._charge_local(op, run)
        return ()

    def _scores(self, op, w, run, q):
        """``q . K`` over the cache, all heads: f32[by, bx, cap, nq] (invalid slots -inf)."""
        kc = self.cache.k[self._layer]  # f32[by, bx, cap, kv/Px]
        part = np.matmul(kc, self.heads.spread(q))  # [by,bx,cap,nq]
        fill = self.cache.max_fill  # the wafer works on filled slots only: the fullest row
        self._charge_local(op, run)
        s = self._allreduce(part, op.axis, name=f"{op.name}/allreduce", words=fill * part.shape[-1])
        return np.where(self.cache.valid(), s * self.scale, -np.inf)

    def _softmax(self, op, w, run, s):
        """Softmax over the sequence (split along y): max and sum allreduced along y."""
        # Invalid slots hold -inf (:meth:`_scores`) and every line has a valid slot, so the max
        # is finite and exp() makes them exactly 0: no mask needed.
        m = self._allreduce(
            np.maximum.reduce(s, 2, keepdims=True), op.axis, "max", f"{op.name}/max"
        )
        e = F.softmax_numerator(s, m)
        z = self._allreduce(np.add.reduce(e, 2, keepdims=True), op.axis, name=f"{op.name}/sum")
        self._charge_local(op, run)
        return F.softmax_normalize(e, z)

    def _pv(self, op, w, run, p):
        """``p . V`` over the cache, all heads: the attention output as an X-vector."""
        vc = self.cache.v[self._layer]
        o = np.matmul(np.swapaxes(vc, 2, 3), p)  # f32[by, bx, kv/Px, nq]
        self._charge_local(op, run)
        return self._allreduce(
            self.heads.pick(o),  # f32[by, bx, kv/Px * G]
            op.axis,
            name=f"{op.name}/allreduce",
            words=op.dims["tq"],
        )

    def _add(self, op, w, run, a, b):
        return a + b

    def _swiglu(self, op, w, run, gu):
        tf = gu.shape[-1] // 2
        self._charge_local(op, run)
        return F.swiglu(gu[..., :tf], gu[..., tf:])

    def _vocab_mask(self, op, w, run, logits):
        return np.where(self.real_vocab[None], logits, np.float32(-np.inf))

    def _argmax(self, op, w, run, logits):
        """Greedy token on the mesh: max along x, then the lowest index holding it."""
        local = logits.max(axis=-1, keepdims=True)
        best = self._allreduce(local, op.axis, "max", f"{op.name}/value")
        idx = np.where(logits == best, self.vocab_index[None], np.iinfo(np.int64).max)
        neg = -idx.min(axis=-1, keepdims=True).astype(np.float64)
        tok = -self._allreduce(neg, op.axis, "max", f"{op.name}/index")
        self.fab.ledger.io(4, 1)  # the token leaves the wafer
        return int(tok.reshape(-1)[0])

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
        logits = self.execute(self.logit_ops, {"x": x}, self.glob, P.Pass())["logits"]
        self.check(logits, first_bad, source)
        return logits

    def step(self, token: int, pos: int) -> np.ndarray:
        """Run ``token`` at position ``pos``; returns its logits (X-vector)."""
        self.cache.begin_token()
        self._token, self._pos = int(token), pos
        run = self._pass(token)
        x = self.execute(self.head_ops, {}, self.glob, run)["x"]
        first_bad = None if _finite(x) else -1
        led = self.fab.ledger
        tape = None  # layer 0's records: every layer of a token writes the same, renamed
        for i in range(len(self.layers)):
            self._layer = i
            with led.section(f"layer{i}"):
                if not self.tape_layers:
                    x = self.execute(self.layer_ops, {"x": x}, self.layers[i], run)["x"]
                else:
                    with led.recording() if tape is None else led.replaying(tape) as got:
                        x = self.execute(self.layer_ops, {"x": x}, self.layers[i], run)["x"]
                    if tape is None:  # the ledger resolves replays once per tape shape
                        assert got is not None  # recording() yields the tape
                        tape = got
            if first_bad is None and not _finite(x):
                first_bad = i
        self.cache.end_token()
        return self.logits(x, first_bad, f"the embedding of token {token}")

    def check(self, logits: np.ndarray, first_bad: int | None, source: str) -> None:
        """Raise :class:`NonFiniteError` if any real logit is not finite.

        One flag per rank, combined over the ranks (control plane), per step; the message
        names the first layer whose output held a non-finite value on any rank (``-1``: the
        input ``source`` already did; none: the final norm or the LM head made them).
        """
        bad = not np.isfinite(np.where(self.real_vocab[None], logits, 0)).all()
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
    def argmax(self, logits: np.ndarray) -> int:
        """Greedy token on the mesh: max along x, then the lowest index holding it."""
        return self.execute(self.pick_ops, {"logits": logits}, self.glob, P.Pass())["token"]

    def gather_logits(self, logits: np.ndarray) -> np.ndarray:
        """All ``vocab_size`` logits on every rank (control plane, for sampling and tests)."""
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

    def spread(self, q: np.ndarray) -> np.ndarray:
        """``f32[by, bx, tk * g]`` queries -> ``f32[by, bx, tk, nkv * g]`` (a reused buffer:
        valid until the next call)."""
        flat = q.reshape(-1)
        self._spread[self.slot] = flat[self.kept] if self.padded else flat
        return self._spread.reshape(self.shape)

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

"""The prompt on the prefill mesh: MeshGEMM, grouped dist-GEMM-T, natural token-row tiles.

The engine executes the prefill program of :mod:`llm.engine.program` (the same op list the estimator
prices): one handler per op kind, activations in a dict, data through the fabric.

Activations are natural tiles: ``X[T, H]`` with tokens along y and features along x, core
``(py, px)`` holding ``X[t-seg py, h-seg px]``, ``f32[by, bx, T/Py, H/Px]``. ``T`` is padded to a
multiple of ``lcm(Py, Px)``; padded token rows are zero at the start, are never attended to (the
causal mask also masks padding keys) and so never change a real row. Several prompts can be
prefilled together (:meth:`MeshPrefiller.run` with ``lengths``): their tokens follow one another
as one ``T``, each at its own positions from 0, and a token attends to the tokens of its own
prompt only (the causal mask is block-diagonal), so each prompt's K/V and hidden states are
those it gets alone, up to float32 sums in another order. Per layer::

    X -> RMSNorm (sum along x) -> q|k|v = MeshGEMM -> RoPE (absolute positions, adjacent pairs)
      -> scores = grouped dist-GEMM-T (groups = K/V heads) -> causal mask, softmax along keys
         (max and sum along x) -> P.V = grouped MeshGEMM (V skewed on the mesh)
      -> O-proj = MeshGEMM -> residual -> RMSNorm -> gate|up = MeshGEMM -> SwiGLU
      -> down = MeshGEMM -> residual

Every query head at once: a core's q segment is its K/V segment times ``G`` (query feature
``kv_feature * G + g``), so ``q`` viewed as rows ``(t, g)`` and columns ``kv_feature`` is a
left operand aligned feature by feature with K and V; the group labels (K/V heads) keep heads
apart in the grouped kernels. Nothing is transposed or replicated.

The kernels and collectives only compute here (``record=False``); each program's records are
written from its shapes by :mod:`llm.engine.kinds`, the layers' once for all layers, exactly as
the estimator writes them.

:meth:`MeshPrefiller.run` returns every layer's K/V and the last layer's output; moving them to
the decode mesh is :class:`llm.engine.handoff.Handoff`'s job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from meshrt import hostio
from meshrt.collectives import KTREE, AllreduceSpec, allreduce
from meshrt.fabric import Fabric
from meshrt.mesh import X, Y, padded
from meshrt.ops.gemm import meshgemm
from meshrt.ops.grouped import grouped_gemm_t, grouped_meshgemm
from meshrt.relayout import fetch_rows

from ..modeling import functional as F
from ..placement.layout import PhaseLayout
from . import program as P
from .kinds import Site, charge, charge_layers


def _keys_max(s: np.ndarray) -> np.ndarray:
    """``s.max(axis=4)`` of scores ``f32[by, bx, T/Py, G, S/Px, n_kv]`` as a few elementwise
    maxima of halves (numpy's reduction over that inner axis loops three values at a time)."""
    while s.shape[4] > 1:
        half = s.shape[4] // 2
        top = np.maximum(s[:, :, :, :, :half], s[:, :, :, :, half : 2 * half])
        if s.shape[4] % 2:
            np.maximum(top[:, :, :, :, :1], s[:, :, :, :, 2 * half :], out=top[:, :, :, :, :1])
        s = top
    return s[:, :, :, :, 0]


def _segments(lengths, tokens: int, lay: PhaseLayout) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt, position)`` of every token row of prompts of ``lengths`` prefilled together,
    ``int[T padded]`` each; padding rows continue the last prompt (as a single prompt's do)."""
    lengths = [int(n) for n in lengths]
    if sum(lengths) != tokens or min(lengths, default=0) < 1:
        raise ValueError(f"prompt lengths {lengths} do not split {tokens} tokens")
    rows = padded(tokens, lay.unit)
    seg = np.repeat(np.arange(len(lengths)), lengths)
    pos = np.concatenate([np.arange(n) for n in lengths])
    pad = rows - tokens
    seg = np.concatenate([seg, np.full(pad, len(lengths) - 1)])
    pos = np.concatenate([pos, pos[-1] + 1 + np.arange(pad)])
    return seg, pos


class MeshPrefiller:
    """The model's prefill path on one fabric.

    Parameters
    ----------
    fab : Fabric
        The prefill mesh (same rank grid as the decode mesh).
    lay : PhaseLayout
        Feature placement on ``fab``'s virtual mesh.
    layers : list of dict
        Per layer, this rank's blocks of the ``layer{i}/...`` tensors of
        :func:`llm.placement.prefill_tiles.prefill_specs` (keys without the prefix).
    glob : dict
        This rank's blocks of the global tensors of
        :func:`llm.placement.prefill_tiles.prefill_specs`.
    allreduce : AllreduceSpec
        Allreduce of the RMSNorm and softmax reductions along x (K-tree by default).
    """

    def __init__(
        self,
        fab: Fabric,
        lay: PhaseLayout,
        layers: list,
        glob: dict,
        allreduce: AllreduceSpec = KTREE,
    ):
        self.fab, self.lay, self.layers, self.glob = fab, lay, layers, glob
        self.spec = allreduce
        self._memo: dict = {}  # what every layer of the running prompt shares
        self._segments: tuple | None = None  # prompts prefilled together: (prompt, position)
        c = lay.config
        self.g = c.group_size
        self.scale = np.float32(c.head_dim**-0.5)
        blocks = [b for w in layers for b in w.values()] + list(glob.values())
        self.weight_words = sum(b.size for b in blocks) // (fab.by * fab.bx)
        self.handlers: dict[str, Callable[..., Any]] = {
            "embed_fetch": self._embed,
            "norm": self._norm,
            "gemm": self._gemm,
            "rope": self._rope,
            "grouped_scores": self._scores,
            "softmax": self._softmax,
            "grouped_pv": self._pv,
            "add": self._add,
            "swiglu": self._swiglu,
            "prompt_logits": self._prompt_logits,
        }

    # -- op handlers -----------------------------------------------------------------------
    def execute(
        self, ops: list, acts: dict, weights: dict, keep: tuple = (), priced: bool = True
    ) -> dict:
        """Run ``ops`` on the activations ``acts`` (updated in place and returned), then
        (``priced``) write their records into the ledger.

        An activation is dropped after the last op that reads it unless it is in ``keep`` (at
        4096 tokens one layer's scores and probabilities are gigabytes per rank).
        """
        last = {k: i for i, op in enumerate(ops) for k in op.inputs}
        with self.fab.ledger.sealed("the prefill program"):  # kernels compute, kinds price
            for i, op in enumerate(ops):
                out = self.handlers[op.kind](op, weights, *(acts[k] for k in op.inputs))
                acts.update(zip(op.outputs, out if len(op.outputs) > 1 else (out,)))
                for k in op.inputs:
                    if last[k] == i and k not in keep and k not in op.outputs:
                        del acts[k]
        if priced:
            charge(ops, self.fab.ledger, Site(self.lay, self.spec, self._run))
        return acts

    def _embed(self, op, w):
        """Embedding rows of the prompt fetched along y: ``f32[by, bx, T/Py, H/Px]``."""
        ids, tl = self._ids, op.dims.rows
        table = w[op.weight]  # f32[by, bx, V/Py, H/Px]
        vr = table.shape[2]
        t = np.arange(ids.size)
        return fetch_rows(
            self.fab, table, op.axis, ids // vr, ids % vr, t // tl, t % tl, tl, False, op.name
        )

    def _norm(self, op, w, x):
        """HF RMSNorm of every token row: ``x * rsqrt(mean(x^2) + eps) * gamma``."""
        c = self.lay.config
        ss = np.einsum("abti,abti->abt", x, x)  # f32[by, bx, T/Py]
        ss = allreduce(self.fab, ss, op.axis, "sum", self.spec, False, f"{op.name}/allreduce")
        inv = F.rms_inverse(ss / np.float32(c.hidden_size), c.rms_norm_eps)
        return F.rms_scale(x, inv[..., None], w[op.weight][:, :, None, :])

    def _gemm(self, op, w, x):
        out = meshgemm(self.fab, x, w[op.weight], name=op.name, record=False)
        return out + w[op.bias][:, :, None, :] if op.bias in w else out

    def _rope(self, op, w, qkv):
        """Split ``q | k | v`` and rotate q ``f32[by, bx, T/Py, q/Px]`` and k
        ``f32[by, bx, T/Py, kv/Px]`` at the absolute positions of the local token rows, every
        pair of both in one pass (:func:`llm.modeling.functional.rope_plan`)."""
        tq, tk = self.lay.q // self.lay.px, self.lay.kv // self.lay.px
        qk = qkv[..., : tq + tk]
        cos, sin, partner = self._angles(qkv.shape[2])
        rot = qk[..., partner]
        rot *= sin
        rot += qk * cos  # F.rotate's products: a c + b (-s) is a c - b s exactly
        return (
            rot[..., :tq],
            np.ascontiguousarray(rot[..., tq:]),
            np.ascontiguousarray(qkv[..., tq + tk :]),
        )

    def _angles(self, tl: int) -> tuple:
        """``cos`` and signed ``sin`` of every local token row's RoPE angle for each of the
        core's ``q | k`` features, ``f32[by, bx, T/Py, (q + kv)/Px]``, and each feature's pair
        partner (the same in every layer: worked out once per prompt)."""
        key = ("angles", tl)
        if key not in self._memo:
            angle, partner, sign = F.rope_plan(self.lay.kv // self.lay.px, self.g)
            pos = (self.fab.index(Y)[:, None] * tl + np.arange(tl)[None, :]).astype(np.float32)
            if self._segments is not None:  # prompts together: each from position 0
                pos = self._segments[1][pos.astype(np.int64)].astype(np.float32)
            theta = pos[:, None, :, None] * self.glob["rope_freq"][:, :, None, :]
            cos, sin = np.cos(theta), np.sin(theta)
            self._memo[key] = cos[..., angle], sin[..., angle] * sign, partner
        return self._memo[key]

    def _scores(self, op, w, q, k):
        """Scores of all heads ``f32[by, bx, T/Py, G, S/Px, n_kv]`` (causal mask: -inf)."""
        fab, g = self.fab, self.g
        heads = self.glob["kv_head"]  # f32[by, bx, kv/Px, n_kv]
        by, bx, tl, tk = k.shape
        # rows (t, g), columns kv features: local column slicing of q, no data movement
        qr = q.reshape(by, bx, tl, tk, g).transpose(0, 1, 2, 4, 3).reshape(by, bx, tl * g, tk)
        s = grouped_gemm_t(
            fab, qr, k, heads, name=op.name, record=False
        )  # [by, bx, tl*g, S/Px, nkv]
        sl, nkv = s.shape[3], s.shape[4]
        s = s.reshape(by, bx, tl, g, sl, nkv)
        s *= self.scale  # in place: s is ours
        np.copyto(s, np.float32(-np.inf), where=self._masked(tl, sl))
        return s

    def _masked(self, tl: int, sl: int) -> np.ndarray:
        """``bool[by, bx, T/Py, 1, S/Px, 1]``: the key is after the query or padding (the
        causal mask's complement, the same in every layer: worked out once per prompt)."""
        key = ("masked", tl, sl)
        if key not in self._memo:
            self._memo[key] = ~self._causal(tl, sl)
        return self._memo[key]

    def _causal(self, tl: int, sl: int) -> np.ndarray:
        """``bool[by, bx, T/Py, 1, S/Px, 1]``: key at or before the query, and a real token
        (prompts prefilled together: also of the query's prompt)."""
        t_glob = self.fab.index(Y)[:, None] * tl + np.arange(tl)[None, :]  # [by, tl]
        s_glob = self.fab.index(X)[:, None] * sl + np.arange(sl)[None, :]  # [bx, S/Px]
        real = (s_glob < self._ids.size)[None, :, None, :]
        causal = (s_glob[None, :, None, :] <= t_glob[:, None, :, None]) & real
        if self._segments is not None:
            seg = self._segments[0]
            causal &= seg[s_glob][None, :, None, :] == seg[t_glob][:, None, :, None]
        return causal[:, :, :, None, :, None]

    def _softmax(self, op, w, s):
        """Softmax along the keys (split along x): max and sum allreduced along x."""
        fab = self.fab
        by, bx, tl, g, sl, nkv = s.shape
        masked = self._masked(tl, sl)
        m = allreduce(fab, _keys_max(s), op.axis, "max", self.spec, False, f"{op.name}/max")
        # F.softmax_numerator and F.softmax_normalize, in one buffer (gigabytes at 4096 tokens)
        e = np.subtract(s, m[:, :, :, :, None, :])
        np.exp(e, out=e)
        np.copyto(e, np.float32(0), where=masked)
        # the sum over the keys in order, as e.sum(axis=4) adds them, without its strided loop
        z = np.einsum("abtgsn->abtgn", e)
        z = allreduce(fab, z, op.axis, "sum", self.spec, False, f"{op.name}/sum")
        e /= z[:, :, :, :, None, :]
        return e

    def _pv(self, op, w, p, v):
        """``P V`` of all heads: ``f32[by, bx, T/Py, q/Px]`` in q order."""
        by, bx, tl, g, sl, nkv = p.shape
        tk = v.shape[3]
        o = grouped_meshgemm(
            self.fab,
            p.reshape(by, bx, tl * g, sl, nkv),
            v,
            self.glob["kv_head"],
            b_preskewed=False,
            name=op.name,
            record=False,
        )
        return o.reshape(by, bx, tl, g, tk).transpose(0, 1, 2, 4, 3).reshape(by, bx, tl, tk * g)

    def _add(self, op, w, a, b):
        return a + b

    def _swiglu(self, op, w, gu):
        tf = gu.shape[-1] // 2
        return F.swiglu(gu[..., :tf], gu[..., tf:])

    def _prompt_logits(self, op, w, logits):
        """Every prompt token's logits gathered on every rank (control plane): f32[T, vocab]."""
        shape = (self._ids.size, self.lay.config.vocab_size)
        return hostio.gather_matrix(self.fab, logits, shape, to_all=True, record=False)

    # -- the whole prompt ------------------------------------------------------------------
    def run(self, ids, all_logits: bool = False, lengths=None) -> dict:
        """Prefill ``ids``.

        ``lengths`` (summing to ``len(ids)``): ``ids`` holds several prompts one after the
        other, of these lengths, prefilled together: each prompt's tokens are at positions
        from 0 and attend to that prompt only.

        Returns
        -------
        dict
            ``k``, ``v``: per layer ``f32[by, bx, T/Py, kv/Px]`` (K rotated); ``x``: the last
            layer's output ``f32[by, bx, T/Py, H/Px]``; ``first_bad``: the first layer whose
            output held a non-finite value on this rank (``-1``: the embedding; ``None``);
            with ``all_logits`` also ``all_logits``, every prompt token's logits
            ``f32[T, vocab]`` on every rank.
        """
        ids = np.asarray([int(t) for t in ids], dtype=np.int64)
        c = self.lay.config
        if ids.size == 0:
            raise ValueError("empty prompt")
        if ids.min() < 0 or ids.max() >= c.vocab_size:
            raise ValueError(f"token ids must be in 0..{c.vocab_size - 1}")
        self._ids, self._run = ids, P.Pass(ids=tuple(ids.tolist()))
        self._segments = None if lengths is None else _segments(lengths, ids.size, self.lay)
        self._memo = {}  # RoPE angles and the mask: a new prompt, new positions
        led = self.fab.ledger
        led.memory(
            "prefill/resident", self.weight_words + P.prefill_activation_words(self.lay, ids.size)
        )
        x = self.execute(P.prefill_head(self.lay, ids.size), {}, self.glob)["x"]
        first_bad = None if np.isfinite(x).all() else -1
        ks, vs = [], []
        layer_ops = P.prefill_layer(self.lay, ids.size)
        for i, w in enumerate(self.layers):
            acts = self.execute(layer_ops, {"x": x}, w, keep=("x", "k", "v"), priced=False)
            x = acts["x"]
            ks.append(acts["k"])
            vs.append(acts["v"])
            if first_bad is None and not np.isfinite(x).all():
                first_bad = i
        charge_layers(layer_ops, len(self.layers), led, Site(self.lay, self.spec, self._run))
        out = {"k": ks, "v": vs, "x": x, "first_bad": first_bad}
        if all_logits:
            out["all_logits"] = self.execute(
                P.prefill_all_logits(self.lay, ids.size), {"x": x}, self.glob
            )["all_logits"]
        return out

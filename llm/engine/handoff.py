"""The switch from prefill to decode: a planned transfer, priced by :meth:`Handoff.cost` and
carried out by :meth:`Handoff.forward`.

Three things cross from the prefill mesh to the decode mesh (both start at the same corner of
the wafer, so their lines share their first core and the shorter line is padded with empty
cores):

``handoff/weights``
    The wafer holds one placement of the weights and re-places it from prefill tiles to decode
    tiles over the NoC (paper section 4.4). The emulator keeps both placements, so this is
    priced only: every element walks from its prefill core to its decode core, all at once;
    about half of them cross each bisection of the mesh in both directions, so the busiest link
    of the narrower cut carries ``W / (4 * side)`` of the ``W`` words; the longest walk is corner
    to corner. Bandwidth-bound: routing stages are not charged.
``handoff/kv/x``, ``handoff/kv/y``
    Every layer's K and V move from the prefill tiles ``[T/Py, kv/Px]`` to the decode cache
    layout through the data plane: real K/V features along x to the decode columns' ranges,
    then real tokens along y to the decode rows' balanced counts (the shift policy's spread).
``handoff/hidden/gather``, ``handoff/hidden/broadcast``
    The last token's hidden state becomes a decode Y-vector: the core row holding it sums its
    segments into a full-length vector along x, then a multicast along y gives it to every row.

The plan is pure arithmetic on the two layouts and the prompt length, so every rank holds the
same copy. :meth:`Handoff.forward` returns the data for the decoder (the cache rows and the
hidden state); it never touches the decoder itself.
"""

from __future__ import annotations

import numpy as np

from meshrt.collectives import KTREE, AllreduceSpec, allreduce, broadcast, broadcast_cost
from meshrt.fabric import Fabric
from meshrt.mesh import MeshError, X, Y, padded
from meshrt.plmr import Cost, Ledger
from meshrt.relayout import move_cost, rank_bounds, rebalance

from ..placement.decode_tiles import decode_tile_shapes
from ..placement.footprint import weight_words_per_core
from ..placement.layout import PhaseLayout
from .kvcache import balanced_counts


def _line_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    n = max(len(a), len(b))
    return np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))


def weight_switch_cost(lay: PhaseLayout, dlay: PhaseLayout) -> Cost:
    """Wafer cost of re-placing the weights from prefill tiles to decode tiles at the switch."""
    per_core = sum(weight_words_per_core(decode_tile_shapes(dlay)).values())
    total = per_core * dlay.py * dlay.px
    rows, cols = max(lay.py, dlay.py), max(lay.px, dlay.px)
    return Cost(words=total / (4 * min(rows, cols)), hops=rows + cols - 2, routes=2)


class Handoff:
    """The planned transfer of a prefilled prompt of ``tokens`` tokens to the decode mesh.

    Parameters
    ----------
    prefill, decode : PhaseLayout
        Layouts of the two phases.
    tokens : int
        Real prompt tokens.
    allreduce : AllreduceSpec
        Of the hidden state's gather along x.
    start : int
        Prompts prefilled together (:meth:`llm.engine.prefill.MeshPrefiller.run` with
        ``lengths``): the prompt's first token row among the ``total`` rows of the prefill.
    total : int, optional
        Token rows of the prefill (default ``tokens``: the prompt was prefilled alone).

    Attributes
    ----------
    src_cols, dst_cols : int[Px], int[Px_d]
        Real K/V features per core column of the prefill / decode mesh.
    src_rows, dst_rows : int[Py], int[Py_d]
        Prompt tokens per core row (``dst_rows`` is what the decode cache holds after it).
    rows_per_core, feats_per_core : int
        Most tokens in a prefill core row; most real features in a decode column.
    """

    def __init__(
        self,
        prefill: PhaseLayout,
        decode: PhaseLayout,
        tokens: int,
        allreduce: AllreduceSpec = KTREE,
        start: int = 0,
        total: int | None = None,
    ):
        if tokens < 1:
            raise ValueError("empty prompt")
        total = tokens if total is None else int(total)
        if start < 0 or start + tokens > total:
            raise ValueError(f"tokens {start}..{start + tokens - 1} are not among {total}")
        self.src, self.dst, self.tokens, self.spec = prefill, decode, int(tokens), allreduce
        self.start = int(start)
        kv = prefill.config.kv_size
        fp, fd = prefill.kv // prefill.px, decode.kv // decode.px
        self.tl = padded(total, prefill.unit) // prefill.py
        self.src_cols = np.clip(kv - np.arange(prefill.px) * fp, 0, fp)
        self.dst_cols = np.clip(kv - np.arange(decode.px) * fd, 0, fd)
        first = np.arange(prefill.py) * self.tl  # each core row's first token row
        self.src_rows = np.clip(
            np.minimum(first + self.tl, start + tokens) - np.maximum(first, start), 0, self.tl
        )
        self.dst_rows = balanced_counts(tokens, decode.py)
        self.rows_per_core = int(self.src_rows.max())
        self.feats_per_core = min(fd, kv)

    # -- price -----------------------------------------------------------------------------
    def cost(self) -> dict:
        """``{ledger name: Cost}`` of every transfer, in order."""
        lay, dlay = self.src, self.dst
        out = {"handoff/weights": weight_switch_cost(lay, dlay)}
        per_item = 2 * lay.config.num_layers
        for name, src, dst, words in (
            ("handoff/kv/x", self.src_cols, self.dst_cols, self.rows_per_core),
            ("handoff/kv/y", self.src_rows, self.dst_rows, self.feats_per_core),
        ):
            out[name] = move_cost(*_line_pair(src, dst), words * per_item)
        for phase, c in self.spec.costs(max(lay.px, dlay.px), lay.hidden):
            out["handoff/hidden/gather" + (f"/{phase}" if phase else "")] = c
        row = (self.start + self.tokens - 1) // self.tl
        out["handoff/hidden/broadcast"] = broadcast_cost(max(lay.py, dlay.py), row, lay.hidden)
        return out

    def charge(self, led: Ledger) -> None:
        """Write :meth:`cost` into ``led`` (one kernel, ``handoff``)."""
        with led.running("handoff"):
            for name, c in self.cost().items():
                led.charge(name, c)

    # -- data ------------------------------------------------------------------------------
    def forward(self, src: Fabric, dst: Fabric, ks: list, vs: list, x: np.ndarray) -> tuple:
        """Move the prompt's K/V and last hidden state from ``src`` to ``dst``'s layout.

        Parameters
        ----------
        src, dst : Fabric
            The prefill and decode fabrics (the same rank grid).
        ks, vs : list of ndarray
            Per layer ``f32[by, bx, T/Py, kv/Px]`` on the prefill mesh (K rotated).
        x : ndarray
            The last layer's output ``f32[by, bx, T/Py, H/Px]``.

        Returns
        -------
        cache_rows : list of (list, list)
            Per layer, the K rows and V rows of every local decode row, ``f32[count_r, bx_d,
            kv_d/Px_d]`` each (``count_r`` from :attr:`dst_rows`), ready for
            :meth:`llm.engine.kvcache.KVCache.load`.
        hidden : ndarray
            The last token's hidden state as a decode Y-vector ``f32[by_d, bx_d, H_d/Py_d]``.
        """
        if (src.layout.ry, src.layout.rx) != (dst.layout.ry, dst.layout.rx):
            raise MeshError(
                f"prefill ranks {src.layout.ry}x{src.layout.rx} and decode ranks "
                f"{dst.layout.ry}x{dst.layout.rx} differ"
            )
        return self._kv(src, dst, ks, vs), self._hidden(src, dst, x)

    def _kv(self, fab: Fabric, dfab: Fabric, ks: list, vs: list) -> list:
        """Real K/V features along x to the decode columns' ranges
        (:func:`~meshrt.relayout.rebalance`), then real tokens along y to the decode rows'
        balanced counts; then each rank cuts its share into decode cores."""
        lay, dlay = fab.layout, self.dst
        nl2 = 2 * len(ks)
        by, bx, tl, fp = ks[0].shape
        data = np.stack(ks + vs)  # [2L, by, bx, T/Py, kv/Px]
        data = data.transpose(0, 1, 3, 2, 4).reshape(nl2, by * tl, bx * fp)  # rank's rows x feats
        ry, rx = fab.coords
        s, d = rank_bounds(self.src_rows, lay.ry), rank_bounds(self.dst_rows, lay.ry)
        lo = min(max(self.start - ry * by * tl, 0), by * tl)  # the prompt's rows on this rank
        data, ys = data[:, lo : lo + s[ry + 1] - s[ry]], (s, d)
        s, d = rank_bounds(self.src_cols, lay.rx), rank_bounds(self.dst_cols, lay.rx)
        data = rebalance(fab, data[:, :, : s[rx + 1] - s[rx]], X, 2, s, d, name="handoff/kv")
        data = rebalance(fab, data, Y, 1, *ys, name="handoff/kv")
        # cut into decode cores: [2L, tokens of this rank, bx_d, kv_d/Px_d]
        fd = dlay.kv // dlay.px
        flat = np.zeros((nl2, data.shape[1], dfab.bx * fd), np.float32)
        flat[:, :, : data.shape[2]] = data
        full = flat.reshape(nl2, data.shape[1], dfab.bx, fd)
        bounds = np.concatenate([[0], np.cumsum(self.dst_rows[dfab.index(Y)])])
        return [
            tuple(
                [full[j, a:b] for a, b in zip(bounds[:-1], bounds[1:])]
                for j in (layer, len(ks) + layer)
            )
            for layer in range(len(ks))
        ]

    def _hidden(self, fab: Fabric, dfab: Fabric, x: np.ndarray) -> np.ndarray:
        """The core row holding the last token writes its segments into a zero-filled
        full-length vector; a sum along x completes it on that row and a multicast along y
        gives it to every core, so every decode core takes its segment locally."""
        lay, dlay = self.src, self.dst
        by, bx, tl, hl = x.shape
        row, slot = divmod(self.start + self.tokens - 1, tl)
        spread = np.zeros((by, bx, lay.px, hl), np.float32)
        mine = np.flatnonzero(fab.index(Y) == row)
        if mine.size:
            spread[mine[0], np.arange(bx), fab.index(X), :] = x[mine[0], :, slot, :]
        full = spread.reshape(by, bx, lay.px * hl)
        full = allreduce(fab, full, X, "sum", self.spec, record=False, name="handoff/hidden/gather")
        full = broadcast(fab, full, Y, row, record=False, name="handoff/hidden/broadcast")
        h = lay.config.hidden_size
        vec = np.zeros(dlay.hidden, np.float32)
        vec[:h] = full[0, 0, :h]
        seg = vec.reshape(dlay.py, dlay.hidden // dlay.py)[dfab.index(Y)]  # [by_d, H_d/Py_d]
        return np.ascontiguousarray(np.broadcast_to(seg[:, None], (dfab.by, dfab.bx, seg.shape[1])))

"""Placing a model's weights on one rank's cores, streamed from the source.

Every weight tensor of a phase is described once, without data, by a *spec*
(:class:`Matrix`, :class:`Vector`, :class:`Const`); :func:`place` turns a spec into the tiles of
any rectangle of cores (one rank's block, or the whole mesh for a converter). A matrix is built a
piece at a time straight from the source: rows are read in contiguous runs
(:func:`read_rows`), permuted and padded into mesh order, cut into tiles and stored in the
phase's storage words (float32, float16, or bfloat16 as ``uint16``, see
:mod:`meshrt.precision`). No whole padded matrix and no global tile array is ever built for a
rank, so placing LLaMA3-8B-sized tensors needs memory for this rank's tiles plus one piece.

Embedding tables are not placed at all on the model path (:class:`RowTable`): a lookup reads
the rows it needs from the source, as the cores holding them would. Weights a phase uses only
now and then (the prefill LM head, for every prompt token's logits) are a :class:`LazyBlock`,
placed when a kernel asks for them and dropped afterwards.

Sources: any mapping of HF tensor names to arrays (a dict,
:class:`~llm.storage.checkpoint.Checkpoint`,
:class:`~llm.storage.checkpoint.RandomWeights`). A source with a ``rows(name, start, stop)`` method
is
read a row range at a time; otherwise the tensor is looked up and sliced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from meshrt.mesh import Axis, X, Y
from meshrt.ops.gemm import prepare_b_region
from meshrt.ops.gemv import gemv_tile, vector_tiles, weight_region
from meshrt.precision import to_words, widen, word_dtype


def read_rows(src: Mapping, name: str, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` of source tensor ``name`` as float32 (``-1`` gives a zero row).

    Reads the one contiguous range that covers the wanted rows.
    """
    idx = np.asarray(idx, dtype=np.int64)
    valid = idx >= 0
    if not valid.any():
        shape = _source_shape(src, name)
        return np.zeros((idx.size,) + tuple(shape[1:]), np.float32)
    want = np.unique(idx[valid])
    # contiguous runs of wanted rows (gaps of up to RUN_GAP rows are read through)
    breaks = np.flatnonzero(np.diff(want) > RUN_GAP) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [want.size]])
    if (
        valid.all()
        and want[-1] - want[0] + 1 == idx.size
        and (idx == np.arange(want[0], want[-1] + 1)).all()
    ):
        return _read_run(src, name, int(want[0]), int(want[-1]) + 1)
    out: np.ndarray | None = None
    for a, z in zip(starts, stops):
        lo, hi = int(want[a]), int(want[z - 1]) + 1
        run = _read_run(src, name, lo, hi)
        if out is None:
            out = np.zeros((idx.size,) + run.shape[1:], np.float32)
        sel = valid & (idx >= lo) & (idx < hi)
        out[sel] = run[idx[sel] - lo]
    assert out is not None, "some row is wanted, so at least one run was read"
    return out


#: rows between two wanted rows that are read through rather than starting a new read
RUN_GAP = 64


class TensorCache(Mapping):
    """A source that keeps the most recently read whole tensors, up to ``budget`` bytes.

    Placement reads one tensor several times (per piece, and once per phase); generating or
    decoding it once is the expensive part. Tensors larger than the budget are passed through
    row range by row range, never held whole.
    """

    def __init__(self, src: Mapping, budget: int = 512 << 20):
        self.src, self.budget = src, int(budget)
        self._held: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str):
        return self.src[name]

    def __iter__(self):
        return iter(self.src)

    def __len__(self) -> int:
        return len(self.src)

    def shape(self, name: str) -> tuple:
        return _source_shape(self.src, name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if name in self._held:
            self._held[name] = self._held.pop(name)  # most recently used last
            return self._held[name][start:stop]
        shape = self.shape(name)
        nbytes = 4 * int(np.prod(shape))
        if nbytes > self.budget:
            return _read_run(self.src, name, start, stop)
        while self._held and sum(a.nbytes for a in self._held.values()) + nbytes > self.budget:
            self._held.pop(next(iter(self._held)))
        whole = _read_run(self.src, name, 0, shape[0] if shape else 1)
        self._held[name] = whole
        return whole[start:stop]


def _read_run(src: Mapping, name: str, lo: int, hi: int) -> np.ndarray:
    if hasattr(src, "rows"):
        return src.rows(name, lo, hi)
    return np.asarray(src[name][lo:hi], dtype=np.float32)


def _source_shape(src, name: str) -> tuple:
    if hasattr(src, "shape") and callable(src.shape):
        return tuple(src.shape(name))
    return tuple(np.shape(src[name]))


def _take_cols(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[:, idx]`` with zero columns where ``idx < 0`` (a view when ``idx`` is a range)."""
    real = np.flatnonzero(idx >= 0)
    if (
        real.size
        and real[-1] == real.size - 1
        and idx[real[-1]] - idx[0] == real.size - 1
        and (np.diff(idx[real]) == 1).all()
    ):
        run = a[:, idx[0] : idx[0] + real.size]  # a run of columns, then padding
        if real.size == idx.size:
            return run
        out = np.zeros((a.shape[0], idx.size), a.dtype)
        out[:, : real.size] = run
        return out
    out = a[:, np.where(idx >= 0, idx, 0)]
    if real.size < idx.size:
        out[:, idx < 0] = 0
    return out


def feature_index(
    perm: Sequence[int] | np.ndarray | None, real: int | None, size: int
) -> np.ndarray:
    """``int[size]``: source index of each mesh feature (``perm`` or the identity over ``real``
    features), ``-1`` for padding. ``real`` is needed only without ``perm``."""
    if perm is None:
        assert real is not None, "without a permutation the real feature count is needed"
        base = np.arange(real, dtype=np.int64)
    else:
        base = np.asarray(perm, np.int64)
    return np.concatenate([base, np.full(size - base.size, -1, np.int64)])


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One source tensor as (part of) a mesh matrix ``W[in, out]``.

    ``out_idx``/``in_idx`` give the source index of each mesh output/input feature (``-1`` for
    padding). An HF linear is stored ``[out, in]``; ``table=True`` is an embedding table used as
    ``W[in=vocabulary, out=hidden]``, stored ``[in, out]``.
    """

    name: str
    out_idx: np.ndarray
    in_idx: np.ndarray
    table: bool = False


@dataclass(frozen=True)
class Matrix:
    """A mesh matrix ``W[in, out]`` from one or more parts, placed for a kernel.

    ``placement``: ``"gemv_y"`` / ``"gemv_x"`` (:func:`meshrt.ops.gemv.weight_tiles`) or
    ``"skew"`` (MeshGEMM pre-skew, :func:`meshrt.ops.gemm.prepare_b`). Several parts are fused
    per core: core column ``c`` of the ``fuse`` columns holds ``[seg c of part 0 | seg c of
    part 1 | ...]`` (one kernel computes all of them; the split is local).
    """

    parts: tuple
    placement: str
    fuse: int = 1
    _cols: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def in_size(self) -> int:
        return self.parts[0].in_idx.size

    @property
    def out_size(self) -> int:
        return sum(p.out_idx.size for p in self.parts)

    @property
    def input_axis(self) -> Axis | None:
        """The mesh axis a GEMV placement cuts the input along (``None``: the MeshGEMM skew)."""
        return Axis.of(self.placement[-1]) if self.placement.startswith("gemv_") else None

    def _column_map(self) -> tuple[np.ndarray, np.ndarray]:
        """``(part, column within the part)`` of every fused output column."""
        if not self._cols:
            segs = np.array([p.out_idx.size // self.fuse for p in self.parts])
            offs = np.concatenate([[0], np.cumsum(segs)])
            f = np.arange(self.out_size)
            core, within = np.divmod(f, offs[-1])
            part = np.searchsorted(offs, within, side="right") - 1
            self._cols["map"] = (part, core * segs[part] + within - offs[part])
        return self._cols["map"]

    def _read(self, src: Mapping, p: Part, rows: np.ndarray, pcols: np.ndarray) -> np.ndarray:
        """``W_p[rows, pcols]`` of one part as float32 (a transposed view for a linear)."""
        if p.table:  # source rows are the input features
            return _take_cols(read_rows(src, p.name, p.in_idx[rows]), p.out_idx[pcols])
        return _take_cols(read_rows(src, p.name, p.out_idx[pcols]), p.in_idx[rows]).T

    def get(self, src: Mapping, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Entries ``W[rows, cols]`` (mesh order, padded) as float32, read from ``src``."""
        seg = self.out_size // self.fuse
        if (
            cols.size
            and cols[0] % seg == 0
            and cols.size % seg == 0
            and cols[-1] - cols[0] == cols.size - 1
        ):
            # whole cores of fused columns: each part's columns are one run, placed by slices
            first, n = cols[0] // seg, cols.size // seg
            out = np.empty((rows.size, n, seg), np.float32)
            off = 0
            for p in self.parts:
                s = p.out_idx.size // self.fuse
                pcols = np.arange(first * s, (first + n) * s)
                out[:, :, off : off + s] = self._read(src, p, rows, pcols).reshape(rows.size, n, s)
                off += s
            return out.reshape(rows.size, cols.size)
        part_of, part_col = self._column_map()
        out = np.zeros((rows.size, cols.size), np.float32)
        for k, p in enumerate(self.parts):
            sel = np.flatnonzero(part_of[cols] == k)
            if not sel.size:
                continue
            out[:, sel] = self._read(src, p, rows, part_col[cols[sel]])
        return out

    def block(
        self, src: Mapping, mesh: tuple, origin: tuple, block: tuple, storage: str = "float32"
    ) -> np.ndarray:
        """Tiles of cores ``origin .. origin + block`` in ``storage`` words."""

        def get(rows, cols):
            return self.get(src, rows, cols)

        shape = (self.in_size, self.out_size)
        if self.input_axis is None:
            return prepare_b_region(get, shape, mesh, origin, block, storage=storage)
        return weight_region(
            get,
            shape,
            mesh,
            self.input_axis,
            origin,
            block,
            storage,
            reader_rows="in" if self.parts[0].table else "out",
        )


@dataclass(frozen=True)
class Vector:
    """Per-feature vectors (norm weights, biases) as X- or Y-vectors, fused per core like
    :class:`Matrix` columns. ``parts``: ``(name, index)`` pairs."""

    parts: tuple
    axis: str

    def block(
        self, src: Mapping, mesh: tuple, origin: tuple, block: tuple, storage: str = "float32"
    ) -> np.ndarray:
        tiles = [
            vector_tiles(read_rows(src, name, idx), mesh, self.axis) for name, idx in self.parts
        ]
        t = tiles[0] if len(tiles) == 1 else np.concatenate(tiles, axis=-1)
        return _region(t, origin, block)


@dataclass(frozen=True)
class Const:
    """Tiles that depend on the layout only (RoPE frequencies, K/V head labels)."""

    make: Callable[[], np.ndarray]

    def block(
        self, src: Mapping, mesh: tuple, origin: tuple, block: tuple, storage: str = "float32"
    ) -> np.ndarray:
        return _region(self.make(), origin, block)


def _region(tiles: np.ndarray, origin: tuple, block: tuple) -> np.ndarray:
    (y0, x0), (by, bx) = origin, block
    return np.ascontiguousarray(tiles[y0 : y0 + by, x0 : x0 + bx])


def place(
    spec,
    src: Mapping,
    mesh: tuple,
    origin: tuple = (0, 0),
    block: tuple | None = None,
    storage: str = "float32",
) -> np.ndarray:
    """Tiles of ``spec`` for cores ``origin .. origin + block`` (default: the whole mesh).

    Matrices are in ``storage`` words; vectors are float32 values at ``storage`` precision;
    constants (RoPE frequencies, head labels: computed, not weights) are float32.
    """
    out = spec.block(src, tuple(mesh), tuple(origin), tuple(block or mesh), storage)
    if isinstance(spec, Vector) and storage != "float32":
        out = widen(to_words(out, storage))
    return out


# ----------------------------------------------------------------------------------------------
# Weights that are not resident
# ----------------------------------------------------------------------------------------------


class RowTable:
    """A rank's block of an embedding table ``[by, bx, R, C]`` whose rows are read on lookup.

    Core ``(a, b)`` slot ``r`` column ``c`` is entry ``E[row, col]`` of the padded table with
    ``orient=X`` (decode: vocabulary segment along x, hidden along y):
    ``row = (x0 + b) R + r``, ``col = (y0 + a) C + c``; ``orient=Y`` (prefill, natural):
    ``row = (y0 + a) R + r``, ``col = (x0 + b) C + c``. Indexing with integers and slices
    returns float32 values at the table's storage precision; only the rows indexed are read.
    ``size`` and ``shape`` are the block's, as if it were resident (the wafer holds it).
    """

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(
        self,
        src: Mapping,
        part: Part,
        shape: tuple,
        origin: tuple,
        orient: Axis | str,
        storage: str = "float32",
    ):
        self.src, self.part, self.shape = src, part, tuple(shape)
        self.origin, self.orient, self.storage = tuple(origin), Axis.of(orient), storage
        self.size = int(np.prod(self.shape))

    def _rows(self, ids: np.ndarray) -> np.ndarray:
        p = self.part
        real = read_rows(self.src, p.name, p.in_idx[ids])  # [n, hidden (source)]
        vals = _take_cols(real, p.out_idx)  # [n, hidden (mesh, padded)]
        return widen(to_words(vals, self.storage))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (4 - len(key))
        if len(key) != 4 or not isinstance(key[3], (int, np.integer, slice)):
            raise IndexError("a row table takes up to 4 indices, the last an int or a slice")
        # core row, core column and slot of every entry asked for, numpy's indexing rules
        # applied to broadcast views (nothing of the block's size is made)
        a, b, r = (
            np.broadcast_to(
                np.arange(n).reshape([-1 if i == k else 1 for i in range(3)]), self.shape[:3]
            )[key[:3]]
            for k, n in enumerate(self.shape[:3])
        )
        y0, x0 = self.origin
        rows_per_core, cols_per_core = self.shape[2], self.shape[3]
        if self.orient == X:
            row, col0 = (x0 + b) * rows_per_core + r, (y0 + a) * cols_per_core
        else:
            row, col0 = (y0 + a) * rows_per_core + r, (x0 + b) * cols_per_core
        ids, inv = np.unique(row, return_inverse=True)
        vals = self._rows(ids)  # [unique rows, padded hidden]
        c = np.arange(cols_per_core)[key[3]]
        out = vals[
            np.reshape(inv, np.shape(row))[..., None],
            np.asarray(col0)[..., None] + np.atleast_1d(c),
        ]
        return out[..., 0] if np.ndim(c) == 0 else out


class LazyBlock:
    """A rank's block placed only when a kernel reads it (``np.asarray(block)``), then dropped.

    ``shape``, ``size`` and ``dtype`` describe the block without placing it.
    """

    def __init__(
        self,
        spec,
        src: Mapping,
        mesh: tuple,
        origin: tuple,
        block: tuple,
        shape: tuple,
        storage: str = "float32",
    ):
        self.spec, self.src, self.mesh = spec, src, tuple(mesh)
        self.origin, self.block_cores, self.storage = tuple(origin), tuple(block), storage
        self.shape = tuple(shape)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.dtype = word_dtype(storage)

    def __array__(self, dtype=None, copy=None):
        out = place(self.spec, self.src, self.mesh, self.origin, self.block_cores, self.storage)
        return out if dtype is None else out.astype(dtype)


def materialize(block) -> np.ndarray:
    """An ndarray of a (possibly lazy) block."""
    return block if isinstance(block, np.ndarray) else np.asarray(block)


class StoredTable:
    """A rank's embedding block ``[by, bx, R, C]`` left in its shard file: indexing reads
    only the entries asked for (HDF5 hyperslab) and widens them to float32."""

    ndim = 4
    dtype = np.dtype(np.float32)

    def __init__(self, dataset, storage: str):
        self.dataset, self.storage = dataset, storage
        self.shape = tuple(dataset.shape)
        self.size = int(np.prod(self.shape))

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if all(isinstance(k, (int, np.integer, slice)) for k in key):
            data = np.asarray(self.dataset[key])  # one hyperslab
        else:  # arrays of cores/slots: read each (core, slot) row once, in numpy's order
            key = key + (slice(None),) * (4 - len(key))
            a, b, r = (
                np.broadcast_to(
                    np.arange(n).reshape([-1 if i == k else 1 for i in range(3)]), self.shape[:3]
                )[key[:3]]
                for k, n in enumerate(self.shape[:3])
            )
            flat = [(int(i), int(j), int(s)) for i, j, s in zip(*(np.ravel(v) for v in (a, b, r)))]
            rows = {t: np.asarray(self.dataset[t]) for t in set(flat)}
            data = np.stack([rows[t][key[3]] for t in flat]).reshape(
                np.shape(a) + np.shape(rows[flat[0]][key[3]]) if flat else (0,)
            )
        if self.storage == "bfloat16":
            return widen(data.astype(np.uint16, copy=False))
        return data.astype(np.float32)


def tile_shape(spec: Matrix, mesh: tuple) -> tuple:
    """Tile shape of a matrix spec on ``mesh`` (a skewed matrix is cut as a Y-input GEMV's)."""
    return gemv_tile(spec.in_size, spec.out_size, mesh, spec.input_axis or Y)


#: How each phase holds each of its tensors on the model path: resident blocks, except
#: ``"rows"`` (an embedding table read a row at a time on lookup) and ``"lazy"`` (placed when a
#: kernel reads it, then dropped).
def residency(phase: str, name: str, tied: bool) -> str:
    if name == "embed" and (phase == "prefill" or not tied):
        return "rows"  # only the rows looked up are ever read
    if phase == "prefill" and name == "lm_head":
        return "lazy"  # every prompt token's logits are rare; the first token uses decode's
    return "resident"


def place_one(
    phase: str,
    name: str,
    spec,
    src: Mapping,
    mesh: tuple,
    origin: tuple,
    block: tuple,
    storage: str = "float32",
    tied: bool = False,
) -> np.ndarray | RowTable | LazyBlock:
    """One rank's block of one tensor of a phase, held as :func:`residency` says."""
    how = residency(phase, name, tied)
    shape = tuple(block) + (tile_shape(spec, mesh) if isinstance(spec, Matrix) else ())
    if how == "rows":
        return RowTable(src, spec.parts[0], shape, origin, spec.input_axis or Y, storage)
    if how == "lazy":
        return LazyBlock(spec, src, mesh, origin, block, shape, storage)
    return place(spec, src, mesh, origin, block, storage)


def place_phases(
    phases: dict,
    src: Mapping,
    storage: str = "float32",
    tied: bool = False,
    progress=None,
    cache_bytes: int = 512 << 20,
) -> dict:
    """This rank's blocks of several phases, ``{phase: {name: block}}``.

    ``phases`` maps a phase to ``(specs, mesh, origin, block)``. Tensors are placed one at a
    time, every phase's copy of a tensor in turn, so each source tensor is read (or generated)
    once through a :class:`TensorCache` of ``cache_bytes``. ``progress(name)`` is called after
    each tensor.
    """
    cached = TensorCache(src, cache_bytes)
    out: dict[str, dict[str, np.ndarray | RowTable | LazyBlock]] = {ph: {} for ph in phases}
    names = list(dict.fromkeys(n for specs, *_ in phases.values() for n in specs))
    for name in names:
        for ph, (specs, mesh, origin, block) in phases.items():
            if name in specs:
                # only resident blocks read through the cache; lazy ones keep the plain source
                how = residency(ph, name, tied)
                out[ph][name] = place_one(
                    ph,
                    name,
                    specs[name],
                    cached if how == "resident" else src,
                    mesh,
                    origin,
                    block,
                    storage,
                    tied,
                )
        if progress is not None:
            progress(name)
    return {ph: {n: out[ph][n] for n in specs} for ph, (specs, *_) in phases.items()}

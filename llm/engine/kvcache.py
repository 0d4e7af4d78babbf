"""The decode KV cache on the mesh: shift-based (the paper's) or concatenation (the baseline).

The sequence is split along y, features along x: core ``(py, px)`` holds the K and V entries of
some tokens (its row's share of the sequence) for K/V feature segment ``px``. Each row keeps its
tokens in a ring buffer of ``capacity`` slots; the rows, top to bottom, hold consecutive runs of
the sequence, so the logical order is preserved.

* **shift**: a new entry enters the bottom row; when rows are unbalanced, every row in the run of
  fuller rows passes its *oldest* entry to the row above, all at once (one hop each). Rows then
  hold ``n // Py`` or ``n // Py + 1`` tokens, the fuller ones at the bottom.
* **concat**: every new entry is appended to the bottom row, which fills up ``Py`` times sooner.

The bookkeeping (ring heads and fill counts per row) is pure arithmetic on the token count, so
every rank holds the same copy without communicating.
"""

from __future__ import annotations

import numpy as np

from meshrt.fabric import Fabric


class ContextFullError(RuntimeError):
    """The cache has no slot left for another token."""


def kv_step(policy: str, tokens: int, rows: int) -> np.ndarray:
    """The rows that pass their oldest entry one row up when a cache of ``rows`` rows holding
    ``tokens`` tokens takes one more: under the shift policy the bottom ``tokens % rows`` rows
    (none when the rows are balanced); none under concat (new tokens join the bottom row).

    The one statement of the shift rule: the cache moves by it, and the estimators price a
    step's shift (``kv_step(...).size > 0``) by it.
    """
    extra = tokens % rows if policy == "shift" else 0
    return np.arange(rows - extra, rows) if extra else np.arange(0)


def balanced_counts(n_tokens: int, rows: int) -> np.ndarray:
    """Tokens per row under the shift policy: ``n // rows`` each, one more in the bottom rows."""
    base, extra = divmod(n_tokens, rows)
    counts = np.full(rows, base, dtype=np.int64)
    if extra:
        counts[rows - extra :] += 1
    return counts


class KVCache:
    """Per-layer K and V blocks ``f32[by, bx, capacity, kv/Px]`` with a shared row bookkeeping.

    Parameters
    ----------
    fab : Fabric
        The decode mesh.
    layers, kv_per_core : int
        Number of layers and K/V features per core (``kv/Px``).
    capacity : int
        Slots per core (per row's ring buffer).
    policy : {"shift", "concat"}
    """

    def __init__(
        self, fab: Fabric, layers: int, kv_per_core: int, capacity: int, policy: str = "shift"
    ):
        if policy not in ("shift", "concat"):
            raise ValueError(f"KV policy must be 'shift' or 'concat', not {policy!r}")
        self.fab, self.policy, self.capacity = fab, policy, int(capacity)
        self.rows = fab.layout.py
        shape = (fab.by, fab.bx, self.capacity, kv_per_core)
        self.k = [np.zeros(shape, np.float32) for _ in range(layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(layers)]
        self.head = np.zeros(self.rows, np.int64)
        self.count = np.zeros(self.rows, np.int64)
        # (senders, head, count) before this token: set by begin_token, cleared by end_token
        self._plan: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        # valid() of the current bookkeeping (every layer asks for it)
        self._valid: np.ndarray | None = None
        # the slots this token's append moves (every layer the same)
        self._moves: tuple | None = None

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return int(self.count.sum())

    @property
    def max_fill(self) -> int:
        """Tokens in the fullest row: the per-core attention work on the critical path."""
        return int(self.count.max(initial=0))

    @property
    def max_tokens(self) -> int:
        """Tokens the cache can hold under its policy (given what is in it now)."""
        if self.policy == "shift":
            return self.rows * self.capacity
        return self.length - int(self.count[-1]) + self.capacity

    @property
    def full(self) -> bool:
        """Whether another token would not fit (:meth:`begin_token` would raise)."""
        return self.length + 1 > self.max_tokens

    @property
    def shifting(self) -> bool:
        """Whether rows pass entries up for the token being run (between begin and end)."""
        return self._plan is not None and len(self._plan[0]) > 0

    def valid(self) -> np.ndarray:
        """``bool[by, 1, capacity, 1]``: slots holding a token, for this rank's rows (read-only;
        computed once per change of the bookkeeping)."""
        if self._valid is None:
            self._valid = self._slots_in_use()
            self._valid.flags.writeable = False
        return self._valid

    def _slots_in_use(self) -> np.ndarray:
        rows = self.fab.index(0)
        slot = np.arange(self.capacity)
        age = (slot[None, :] - self.head[rows][:, None]) % self.capacity
        return (age < self.count[rows][:, None])[:, None, :, None]

    def begin_token(self) -> None:
        """Plan the movement for the next token (the same for every layer)."""
        n = self.length
        if n + 1 > self.max_tokens:
            raise ContextFullError(
                f"KV cache full: {n} tokens fill the {self.policy} cache "
                f"({self.rows} rows x {self.capacity} slots per core"
                f"{'' if self.policy == 'shift' else ', new tokens only in the bottom row'})"
            )
        senders = kv_step(self.policy, n, self.rows)
        self._plan = (senders, self.head.copy(), self.count.copy())
        self._valid = self._moves = None
        if len(senders):  # the bookkeeping moves at once: attention sees the new token
            self.head[senders] = (self.head[senders] + 1) % self.capacity
            self.count[senders] -= 1
            self.count[senders - 1] += 1
        self.count[-1] += 1

    def end_token(self) -> None:
        self._plan = self._moves = None

    # -- data movement ---------------------------------------------------------------------
    def append(
        self,
        layer: int,
        k: np.ndarray,
        v: np.ndarray,
        name: str = "kv_append",
        memory: bool = True,
    ) -> None:
        """Insert this token's ``k``, ``v`` (X-vectors ``f32[by, bx, kv/Px]``) into ``layer``.

        Under the shift policy the rows ``senders`` pass their oldest entry one row up first
        (:attr:`shifting`; the caller prices the move, see
        :func:`llm.engine.program.kv_shift_cost`). ``memory=False``: the caller records the
        memory figure (a batch records all its caches at once).
        """
        fab = self.fab
        words = k.shape[-1]
        if self._moves is None:  # the same slots for every layer of the token
            self._moves = self._token_moves()
        local, oldest_slot, into, tail, new_slot = self._moves
        if into is not None:
            kc, vc = self.k[layer], self.v[layer]
            # every row's oldest K and V entry, f32[by, bx, 2 kv/Px]: they travel together
            oldest = np.concatenate([kc[local, :, oldest_slot], vc[local, :, oldest_slot]], -1)
            moved = fab.shift(oldest, 0, -1, op=name)  # row py gets row py+1's
            kc[into, :, tail] = moved[into, :, :words]
            vc[into, :, tail] = moved[into, :, words:]
        if new_slot is not None:  # this rank holds the bottom row: the new entry
            self.k[layer][-1, :, new_slot] = k[-1]
            self.v[layer][-1, :, new_slot] = v[-1]
        if memory:
            fab.ledger.memory("kv_cache", 2 * len(self.k) * self.capacity * words)

    def _token_moves(self) -> tuple:
        """``(local rows, their oldest slots, receiving local rows, their free slots, the bottom
        row's slot)`` of this token's append (``None`` parts: no shift / no bottom row)."""
        assert self._plan is not None, "begin_token() plans a token before its appends"
        senders, head, count = self._plan  # state before this token
        rows = self.fab.index(0)
        local, into, tail, new_slot = np.arange(self.fab.by), None, None, None
        if len(senders):
            # local rows that receive: the senders are one run of rows, each passes one up
            into = np.flatnonzero((rows >= senders[0] - 1) & (rows < senders[-1]))
            tail = (head[rows[into]] + count[rows[into]]) % self.capacity
        if rows[-1] == self.rows - 1:
            new_slot = (head[-1] + count[-1]) % self.capacity  # == the sent oldest if full
        return local, head[rows], into, tail, new_slot

    def load(self, layer: int, k_rows: list, v_rows: list) -> None:
        """Fill ``layer`` from per-local-row token lists ``f32[count_r, bx, kv/Px]`` (prefill)."""
        for i, (kr, vr) in enumerate(zip(k_rows, v_rows)):
            n = kr.shape[0]
            self.k[layer][i, :, :n] = np.moveaxis(kr, 0, 1)
            self.v[layer][i, :, :n] = np.moveaxis(vr, 0, 1)

    def set_counts(self, counts) -> None:
        """Bookkeeping after :meth:`load`: every row starts at slot 0 with ``counts[r]`` tokens."""
        counts = np.asarray(counts, np.int64)
        if counts.max(initial=0) > self.capacity:
            raise ContextFullError(
                f"prompt needs {counts.max()} slots per core; capacity is {self.capacity}"
            )
        self.head[:] = 0
        self.count[:] = counts
        self._valid = None

    def order(self) -> list[tuple[int, int]]:
        """``(row, slot)`` of every cached token in logical order (for tests and inspection)."""
        return [
            (r, int((self.head[r] + j) % self.capacity))
            for r in range(self.rows)
            for j in range(int(self.count[r]))
        ]

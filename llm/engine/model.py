"""The model on the mesh: weights placed, prefill and decode engines, the KV cache between them.

``MeshModel`` is what the command line and tests drive. It holds one fabric per phase (the same
rank grid, possibly different virtual meshes), the weight blocks of this rank, and a ledger per
phase so that modeled wafer time to first token and time per output token are reported apart.

Weights come either from HF tensors in memory (:meth:`MeshModel.from_weights`, small models and
tests) or from converted shards (:meth:`MeshModel.from_shards`); both go through the same tile
producers, so the two paths hold identical blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from meshrt.collectives import KTREE, AllreduceSpec
from meshrt.fabric import Fabric
from meshrt.mesh import MeshError, MeshLayout
from meshrt.movers import DEFAULT_EMULATION, mover_of
from meshrt.plmr import Ledger, get_device
from meshrt.runtime import ControlPlane

from ..modeling.config import ModelConfig
from ..placement.decode_tiles import stream_gemv_weights
from ..placement.layout import PhaseLayout
from ..placement.phase_tiles import PHASE_SPECS
from .decode import MeshDecoder
from .kvcache import KVCache

if TYPE_CHECKING:
    from .prefill import MeshPrefiller


def split_layers(blocks: Mapping, layers: int) -> tuple[list, dict]:
    """``{"layer3/qkv": b, "embed": e}`` -> ``([{...layer 0...}, ...], {"embed": e})``."""
    per: list[dict] = [dict() for _ in range(layers)]
    glob = {}
    for name, block in blocks.items():
        head, _, key = name.partition("/")
        if key and head.startswith("layer") and head[5:].isdigit():
            per[int(head[5:])][key] = block
        else:
            glob[name] = block
    return per, glob


def mesh_layouts(nranks: int, decode_mesh, prefill_mesh=None, ranks=None) -> dict:
    """Validated :class:`MeshLayout` of each phase on one rank grid."""
    decode_mesh = tuple(decode_mesh)
    prefill_mesh = tuple(prefill_mesh or decode_mesh)
    if ranks is None:
        from meshrt.mesh import default_rank_grid

        ranks = default_rank_grid(
            nranks,
            math.gcd(decode_mesh[0], prefill_mesh[0]),
            math.gcd(decode_mesh[1], prefill_mesh[1]),
        )
    if ranks[0] * ranks[1] != nranks:
        raise MeshError(
            f"rank grid {ranks[0]}x{ranks[1]} needs {ranks[0] * ranks[1]} ranks but "
            f"{nranks} are running"
        )
    return {
        "decode": MeshLayout(*decode_mesh, *ranks),
        "prefill": MeshLayout(*prefill_mesh, *ranks),
    }


def _bar(total: int, desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="tensor",
        disable=None if show else True,
        leave=False,
        mininterval=1.0,
    )


class MeshModel:
    """A LLaMA-family model placed on an emulated wafer.

    Parameters
    ----------
    config : ModelConfig
    control : ControlPlane or None
        The ranks; ``None`` runs in one process without MPI.
    decode_mesh, prefill_mesh : (int, int)
        Virtual meshes ``(Py, Px)`` of the two phases (prefill defaults to the decode mesh).
    ranks : (int, int), optional
        Rank grid; by default the squarest grid that divides both meshes.
    blocks : dict
        ``{phase: {name: block}}`` of this rank (see :meth:`from_weights`, :meth:`from_shards`).
    kv_policy : {"shift", "concat"}
    device : str or Device
        Device whose PLMR model prices the run.
    allreduce : AllreduceSpec
        Allreduce of every reduction, in both phases and the hand-off (the command line builds
        it from its flags).
    emulation : {"exact", "aggregated"}
        The fabrics' mover (:mod:`meshrt.movers`; default
        :data:`meshrt.movers.DEFAULT_EMULATION`): tokens and ledger are the same either way.
    """

    def __init__(
        self,
        config: ModelConfig,
        control: ControlPlane | None,
        decode_mesh,
        blocks: Mapping,
        prefill_mesh=None,
        ranks=None,
        kv_policy: str = "shift",
        device="wse2",
        allreduce: AllreduceSpec = KTREE,
        emulation: str = DEFAULT_EMULATION,
    ):
        self.config = config
        self.control = control = control or ControlPlane.single()
        self.layouts = mesh_layouts(control.size, decode_mesh, prefill_mesh, ranks)
        device = get_device(device)
        mover = mover_of(emulation)
        self.fabrics = {
            ph: Fabric(control, lay, ledger=Ledger(device), mover=mover)
            for ph, lay in self.layouts.items()
        }
        self.phase_layouts = {
            ph: PhaseLayout(config, lay.py, lay.px) for ph, lay in self.layouts.items()
        }
        self.kv_policy = kv_policy
        self.allreduce = allreduce
        self.blocks = blocks
        decode_specs = PHASE_SPECS["decode"](self.phase_layouts["decode"])
        stream_gemv_weights(blocks["decode"], decode_specs)  # in place, a tensor at a time
        layers, glob = split_layers(blocks["decode"], config.num_layers)
        self._decode_weights = (layers, glob)
        self.decoder: MeshDecoder | None = None
        self._weight_words: int | None = None  # decode weight words per core (this rank)
        self.prefiller: MeshPrefiller | None = None
        if "prefill" in blocks:
            from .prefill import MeshPrefiller

            self.prefiller = MeshPrefiller(
                self.fabrics["prefill"],
                self.phase_layouts["prefill"],
                *split_layers(blocks["prefill"], config.num_layers),
                allreduce=allreduce,
            )
        self.position = 0

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_weights(
        cls,
        config: ModelConfig,
        weights: Mapping,
        control: ControlPlane | None = None,
        decode_mesh=(2, 2),
        prefill_mesh=None,
        ranks=None,
        phases: Iterable[str] | None = None,
        storage: str = "float32",
        progress: bool | None = None,
        **kwargs,
    ) -> MeshModel:
        """Place HF-named weights on this rank, streamed from ``weights``.

        ``weights`` is any mapping of HF names to arrays: a dict, a lazy
        :class:`~llm.storage.checkpoint.Checkpoint` or
        :class:`~llm.storage.checkpoint.RandomWeights` (read a
        row range at a time). Each tensor is placed straight into this rank's block
        (:mod:`llm.placement.streamed`), in ``storage`` words (``"float32"``, ``"float16"`` or
        ``"bfloat16"``; kernels widen them to float32 per tile). Embedding tables stay in the
        source and are read a row per lookup.
        """
        from ..placement.streamed import place_phases

        control = control or ControlPlane.single()
        layouts = mesh_layouts(control.size, decode_mesh, prefill_mesh, ranks)
        todo = {}
        for phase in phases or PHASE_SPECS:
            lay = layouts[phase]
            todo[phase] = (
                PHASE_SPECS[phase](PhaseLayout(config, lay.py, lay.px)),
                (lay.py, lay.px),
                lay.origin(control.coords((lay.ry, lay.rx))),
                (lay.by, lay.bx),
            )
        n = len(set().union(*(specs for specs, *_ in todo.values())))
        bar = _bar(n, "placing", control.is_root and progress is not False)
        blocks = place_phases(
            todo, weights, storage, config.tie_word_embeddings, lambda _: bar.update(1)
        )
        bar.close()
        lay = layouts["decode"]
        return cls(config, control, decode_mesh, blocks, prefill_mesh, (lay.ry, lay.rx), **kwargs)

    @classmethod
    def from_shards(
        cls,
        path,
        control: ControlPlane | None = None,
        decode_mesh=None,
        prefill_mesh=None,
        ranks=None,
        verify: bool = True,
        **kwargs,
    ) -> MeshModel:
        """Load this rank's blocks from a converted shard set (validated first)."""
        from ..storage.shards import open_shards

        shards = open_shards(
            path,
            control,
            decode_mesh=decode_mesh,
            prefill_mesh=prefill_mesh,
            ranks=ranks,
            verify=verify,
        )
        from ..placement.streamed import Matrix, StoredTable, residency

        tied = shards.config.tie_word_embeddings
        blocks: dict[str, dict] = {}
        for ph in shards.phases:
            blocks[ph] = {}
            mesh = shards.mesh(ph)
            specs = PHASE_SPECS[ph](PhaseLayout(shards.config, *mesh))
            for n in shards.names(ph):
                if residency(ph, n, tied) == "resident":  # matrices stay in storage words
                    blocks[ph][n] = shards.read(ph, n, words=isinstance(specs.get(n), Matrix))
                else:  # left in the file: read on use, a row or a tensor at a time
                    blocks[ph][n] = (
                        StoredTable(shards.dataset(ph, n), shards.dtype)
                        if n == "embed"
                        else _StoredBlock(shards, ph, n)
                    )
        dm = shards.mesh("decode")
        pm = shards.mesh("prefill") if "prefill" in shards.phases else dm
        return cls(shards.config, control, dm, blocks, pm, shards.ranks, **kwargs)

    # -- running ---------------------------------------------------------------------------
    @property
    def decode_fabric(self) -> Fabric:
        return self.fabrics["decode"]

    def start(self, capacity: int) -> None:
        """A fresh KV cache of ``capacity`` slots per core (per row ring)."""
        fab = self.decode_fabric
        lay = self.phase_layouts["decode"]
        cache = KVCache(fab, self.config.num_layers, lay.kv // lay.px, capacity, self.kv_policy)
        self.decoder = MeshDecoder(fab, lay, *self._decode_weights, cache, self.allreduce)
        self.position = 0
        self._note_resident(capacity)

    def _note_resident(self, capacity: int) -> None:
        """The decode ledger's ``decode/resident`` figure: this rank's weight words per core
        (counted once) and caches of ``capacity`` slots per core in all."""
        fab, lay = self.decode_fabric, self.phase_layouts["decode"]
        if self._weight_words is None:
            blocks = self.blocks["decode"].values()
            self._weight_words = sum(b.size for b in blocks) // (fab.by * fab.bx)
        kv = 2 * self.config.num_layers * capacity * (lay.kv // lay.px)
        fab.ledger.memory("decode/resident", self._weight_words + kv)

    # -- several sequences (batched decode) ------------------------------------------------
    def open_sequence(self, capacity: int) -> Sequence:
        """A new sequence with its own KV cache of ``capacity`` slots per core (not yet run)."""
        fab = self.decode_fabric
        lay = self.phase_layouts["decode"]
        cache = KVCache(fab, self.config.num_layers, lay.kv // lay.px, capacity, self.kv_policy)
        if self.decoder is None:
            self.decoder = MeshDecoder(fab, lay, *self._decode_weights, cache, self.allreduce)
        return Sequence(cache)

    def _enter(self, seq: Sequence) -> None:
        self.running.cache, self.position = seq.cache, seq.position

    def prefill_sequence(self, seq: Sequence, ids: list[int]) -> np.ndarray:
        """:meth:`prefill` into ``seq``'s cache; returns the last token's logits."""
        self._enter(seq)
        logits = self.prefill(ids)
        seq.position = self.position
        return logits

    def prefill_sequences(self, seqs: list, prompts: list) -> np.ndarray:
        """Prefill ``prompts[i]`` into ``seqs[i]``'s cache, all the prompts in one prefill
        (:meth:`llm.engine.prefill.MeshPrefiller.run` with their lengths: each attends to
        itself only), then one hand-off per sequence; returns the last tokens' logits as
        :meth:`decode_sequences` does. One sequence (or no prefill engine): :meth:`prefill`
        per sequence.
        """
        if len(seqs) != len(prompts):
            raise ValueError("one prompt per sequence")
        if self.prefiller is None or len(seqs) == 1 or any(s.position for s in seqs):
            logits = [self.prefill_sequence(s, list(p)) for s, p in zip(seqs, prompts)]
            return logits[0] if len(logits) == 1 else np.stack(logits, 2)
        lengths = [len(p) for p in prompts]
        limit = self.config.max_position_embeddings
        if min(lengths) < 1:
            raise ValueError("empty prompt")
        if max(lengths) > limit:
            raise ValueError(f"prompt of {max(lengths)} tokens exceeds the context of {limit}")
        total, hands, start = sum(lengths), [], 0
        for seq, n in zip(seqs, lengths):
            hands.append(self._handoff(n, seq.cache, start, total))
            start += n
        ids = [int(t) for p in prompts for t in p]
        out = self.prefiller.run(ids, lengths=lengths)
        hidden = []
        for seq, hand in zip(seqs, hands):
            hidden.append(self._hand_over(hand, seq.cache, out))
            seq.position = hand.tokens
        return self.running.logits(np.stack(hidden, 2), out["first_bad"], "the prompts' embeddings")

    def decode_sequences(self, seqs: list, tokens: list) -> np.ndarray:
        """Feed ``tokens[i]`` to ``seqs[i]``, all in one decode step.

        Returns the logits: one X-vector ``f32[by, bx, V/Px]`` for one sequence (the step of
        :meth:`decode`, figures and all), else ``f32[by, bx, B, V/Px]``.
        """
        limit = self.config.max_position_embeddings
        if any(s.position >= limit for s in seqs):
            raise ValueError(f"context of {limit} tokens is full")
        if len(seqs) == 1:
            self._enter(seqs[0])
            logits = self.decode(tokens[0])
            seqs[0].position = self.position
            return logits
        dec = self.running
        self._note_resident(sum(s.cache.capacity for s in seqs))
        logits = dec.step_batch(tokens, [s.position for s in seqs], [s.cache for s in seqs])
        for s in seqs:
            s.position += 1
        return logits

    def pick_sequences(self, logits: np.ndarray, samplers: list) -> list[int]:
        """Next token of each sequence (:meth:`pick` per sequence, one mesh pass for all): the
        greedy ones by the argmax on the mesh, the others by their sampler on the host."""
        if logits.ndim == 3:
            return [self.pick(logits, samplers[0])]
        greedy = [s is None or getattr(s, "greedy", False) for s in samplers]
        tokens = list(self.running.argmax(logits)) if any(greedy) else [-1] * len(samplers)
        if not all(greedy):
            full = self.running.gather_logits(logits)  # f32[B, vocab] on every rank
            if self.control.is_root:  # only root's values count
                for i, sampler in enumerate(samplers):
                    if not greedy[i]:
                        tokens[i] = int(sampler(full[i]))
            tokens = [int(t) for t in self.control.bcast(tokens)]  # the host's choices
        return tokens

    @property
    def running(self) -> MeshDecoder:
        """The decoder of the current sequence (:meth:`start`, or the first :meth:`prefill`)."""
        if self.decoder is None:
            raise RuntimeError("no sequence is running: start() or prefill() first")
        return self.decoder

    def capacity_for(self, tokens: int) -> int:
        """Slots per core so that ``tokens`` fit under the KV policy."""
        rows = self.layouts["decode"].py
        if self.kv_policy == "shift":
            return max(1, math.ceil(tokens / rows))
        return max(1, tokens)

    def prefill(self, ids: list[int], all_logits: bool = False):
        """Run the prompt; returns the last token's logits (decode X-vector).

        With ``all_logits`` returns ``(logits, f32[T, vocab])``: also every prompt token's
        logits, gathered on every rank (control plane; for scoring and tests).
        """
        if self.decoder is None:
            self.start(self.capacity_for(len(ids) + 1))
        if len(ids) == 0:
            raise ValueError("empty prompt")
        if self.position + len(ids) > self.config.max_position_embeddings:
            raise ValueError(
                f"prompt of {len(ids)} tokens exceeds the context of "
                f"{self.config.max_position_embeddings}"
            )
        if self.prefiller is not None and self.position == 0:
            return self._prefill_and_hand_off(self.prefiller, ids, all_logits)
        logits, every = None, []
        for t in ids:  # no prefill engine: the prompt goes through decode steps
            logits = self.decode(t)
            if all_logits:
                every.append(self.logits_to_host(logits))
        return (logits, np.array(every)) if all_logits else logits

    def _prefill_and_hand_off(self, prefiller: MeshPrefiller, ids, all_logits: bool):
        """Prefill on the prefill mesh, move the result with a :class:`~llm.engine.handoff.Handoff`
        (priced in the prefill ledger), load the decode cache, then the first logits."""
        cache = self.running.cache
        hand = self._handoff(len(ids), cache)
        out = prefiller.run(ids, all_logits=all_logits)
        hidden = self._hand_over(hand, cache, out)
        logits = self.running.logits(hidden, out["first_bad"], "the prompt's embeddings")
        self.position = len(ids)
        return (logits, out["all_logits"]) if all_logits else logits

    def _handoff(self, tokens: int, cache: KVCache, start: int = 0, total: int | None = None):
        """The :class:`~llm.engine.handoff.Handoff` of a prompt of ``tokens`` (rows ``start..``
        of a prefill of ``total``) into ``cache``; ``ContextFullError`` before any work if the
        cache cannot hold it."""
        from .handoff import Handoff
        from .kvcache import ContextFullError

        pl, dl = self.phase_layouts["prefill"], self.phase_layouts["decode"]
        hand = Handoff(pl, dl, tokens, self.allreduce, start=start, total=total)
        if hand.dst_rows.max() > cache.capacity:
            raise ContextFullError(
                f"prompt of {tokens} tokens needs {hand.dst_rows.max()} KV "
                f"slots per decode core; capacity is {cache.capacity}"
            )
        return hand

    def _hand_over(self, hand, cache: KVCache, out: dict) -> np.ndarray:
        """Move ``hand``'s prompt from the prefill result ``out`` to the decode mesh (priced in
        the prefill ledger) and load it into ``cache``; returns its hidden state there."""
        pfab = self.fabrics["prefill"]
        cache_rows, hidden = hand.forward(pfab, self.decode_fabric, out["k"], out["v"], out["x"])
        hand.charge(pfab.ledger)
        cache.set_counts(hand.dst_rows)
        for layer, (k_rows, v_rows) in enumerate(cache_rows):
            cache.load(layer, k_rows, v_rows)
        return hidden

    def decode(self, token: int) -> np.ndarray:
        """Feed one token; returns its logits (decode X-vector ``f32[by, bx, V/Px]``)."""
        if self.position >= self.config.max_position_embeddings:
            raise ValueError(f"context of {self.config.max_position_embeddings} tokens is full")
        logits = self.running.step(int(token), self.position)
        self.position += 1
        return logits

    def pick(self, logits: np.ndarray, sampler=None) -> int:
        """Next token: greedy on the mesh, or ``sampler`` on the host (logits gathered)."""
        if sampler is None or getattr(sampler, "greedy", False):
            return self.running.argmax(logits)
        full = self.running.gather_logits(logits)
        tok = sampler(full) if self.control.is_root else -1  # only root's value counts
        return int(self.control.bcast(tok))  # control plane: the host's choice

    def logits_to_host(self, logits: np.ndarray) -> np.ndarray:
        return self.running.gather_logits(logits)

    def ledgers(self) -> dict[str, Ledger]:
        return {ph: fab.ledger for ph, fab in self.fabrics.items()}


@dataclass
class Sequence:
    """One request's state on the decode mesh: its own KV cache and its next position."""

    cache: KVCache
    position: int = 0


class _StoredBlock:
    """A shard block read only when a kernel asks for it (``np.asarray``), then dropped."""

    def __init__(self, shards, phase: str, name: str):
        from meshrt.precision import word_dtype

        self.shards, self.phase, self.name = shards, phase, name
        self.shape = shards.block_shape(phase, name)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))
        self.dtype = word_dtype(shards.dtype)

    def __array__(self, dtype=None, copy=None):
        out = self.shards.read(self.phase, self.name, words=True)
        return out if dtype is None else out.astype(dtype)

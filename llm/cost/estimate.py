"""Closed-form wafer cost of decoding one token and of prefill, for meshes too large to emulate.

Both walk the phase's program (:mod:`llm.engine.program`), the same op list the emulator
executes, and price every op from its shapes alone with the op kinds' costs
(:func:`llm.engine.kinds.charge`), as the emulator does after running it: :func:`decode_token`
writes exactly the records :class:`llm.engine.decode.MeshDecoder` writes when it runs a token,
:func:`prefill` (with :func:`first_token`, summed by :func:`ttft`) those of
:class:`llm.engine.prefill.MeshPrefiller` and the hand-off (tests tie them on emulated meshes).
No data is touched, so paper-scale meshes (e.g. LLaMA3-8B on 420 x 420 cores) are priced in
milliseconds.

Prefill attention is priced over the whole ``T x T`` square, not its causal half: every
lockstep step of dist-GEMM-T and of the P.V MeshGEMM is priced by its busiest core, and the
core row holding the last prompt segment needs every key segment at every step, so skipping
the masked blocks shortens no step on a square mesh (it saves energy, not time). The paper's
public prefill kernel likewise applies no mask and computes every block
(``waferllm-code-notes.md`` §4.2); see the README's pricing rules.
"""

from __future__ import annotations

import math

import numpy as np

from meshrt.collectives import KTREE, AllreduceSpec
from meshrt.plmr import Device, Ledger, get_device

from ..engine import program as P
from ..engine.handoff import Handoff
from ..engine.kinds import Site, charge, charge_layers
from ..engine.kvcache import balanced_counts, kv_step
from ..modeling.config import ModelConfig
from ..placement.decode_tiles import decode_tile_shapes
from ..placement.footprint import kv_slot_words, weight_words_per_core
from ..placement.layout import PhaseLayout
from ..placement.prefill_tiles import prefill_weight_words


def row_fill(policy: str, tokens: int, rows: int, prompt: int = 0) -> int:
    """Tokens in the fullest row of a cache holding ``tokens`` (``prompt`` of them from prefill)."""
    if tokens <= 0:
        return 0
    if policy == "shift":
        return math.ceil(tokens / rows)
    # concat: the prompt is spread like the shift policy, every later token joins the bottom row
    spread = balanced_counts(min(prompt, tokens), rows)
    return int(max(spread.max(initial=0), spread[-1] + tokens - min(prompt, tokens)))


def decode_resident_words(config: ModelConfig, mesh: tuple[int, int], capacity: int) -> int:
    """Words per core the decode phase holds: its weights and a cache of ``capacity`` slots."""
    return decode_weight_words(config, mesh) + capacity * kv_words_per_token(config, mesh)


def decode_token(
    config: ModelConfig,
    mesh: tuple[int, int],
    device: Device | str = "wse2",
    context: int = 1,
    policy: str = "shift",
    prompt: int = 0,
    token_col: int = 0,
    allreduce: AllreduceSpec = KTREE,
    greedy: bool = True,
    ledger: Ledger | None = None,
    kv_capacity: int | None = None,
    links: tuple[int, int] = (1, 1),
) -> Ledger:
    """Ledger of one decode step with ``context`` tokens in the cache after it.

    Parameters
    ----------
    mesh : (Py, Px)
        Decode virtual mesh.
    context : int
        Cache length including this token.
    token_col : int
        Mesh column holding the input token's embedding row (sets the lookup broadcast).
    allreduce : AllreduceSpec
    greedy : bool
        Whether the next token is picked on the mesh (argmax) after this step.
    kv_capacity : int, optional
        Slots per core reserved for the cache (for the memory figure).
    links : (int, int)
        Physical hops per logical link of the stage's region (see
        :func:`llm.engine.kinds.charge`).
    """
    device = get_device(device)
    led = ledger if ledger is not None else Ledger(device)
    lay = PhaseLayout(config, *mesh)
    fill = row_fill(policy, context, mesh[0], prompt)
    cap = kv_capacity if kv_capacity is not None else fill
    run = P.Pass(
        fill=fill,
        shifts=kv_step(policy, context - 1, mesh[0]).size > 0,
        capacity=cap,
        token_col=token_col,
    )
    led.memory("decode/resident", decode_resident_words(config, mesh, cap))
    site = Site(lay, allreduce, run)
    charge(P.decode_head(lay), led, site, links)
    charge_layers(P.decode_layer(lay), config.num_layers, led, site, links)
    tail = P.decode_logits(lay) + (P.decode_pick(lay) if greedy else [])
    charge(tail, led, site, links)
    return led


def decode_batch_step(
    config: ModelConfig,
    mesh: tuple[int, int],
    contexts,
    device: Device | str = "wse2",
    policy: str = "shift",
    prompts=None,
    token_cols=None,
    allreduce: AllreduceSpec = KTREE,
    greedy: bool = True,
    ledger: Ledger | None = None,
    kv_capacity: int | None = None,
    links: tuple[int, int] = (1, 1),
) -> Ledger:
    """Ledger of one decode step of ``len(contexts)`` sequences decoded together.

    Every vector op carries one vector per sequence; attention runs over each sequence's own
    cache, sequence ``i`` holding ``contexts[i]`` tokens after the step (``prompts[i]`` of them
    from prefill). Exactly the records :meth:`llm.engine.decode.MeshDecoder.step_batch` writes.

    Parameters
    ----------
    contexts : sequence of int
        Cache length of each sequence including this step's token.
    prompts : sequence of int, optional
        Prompt tokens of each cache (the concat policy's spread; default 0).
    token_cols : sequence of int, optional
        Mesh column of each input token's embedding row (default 0).
    kv_capacity : int, optional
        Slots per core of all the caches together (default: their fills).
    links : (int, int)
        Physical hops per logical link of the stage's region (see
        :func:`llm.engine.kinds.charge`).
    """
    device = get_device(device)
    led = ledger if ledger is not None else Ledger(device)
    lay = PhaseLayout(config, *mesh)
    b = len(contexts)
    prompts = list(prompts) if prompts is not None else [0] * b
    fills = [row_fill(policy, c, mesh[0], p) for c, p in zip(contexts, prompts)]
    cap = kv_capacity if kv_capacity is not None else sum(fills)
    run = P.Pass(
        fill=sum(fills),
        shifts=sum(kv_step(policy, c - 1, mesh[0]).size > 0 for c in contexts),
        capacity=cap,
        token_cols=tuple(token_cols) if token_cols is not None else (0,) * b,
    )
    led.memory("decode/resident", decode_resident_words(config, mesh, cap))
    site = Site(lay, allreduce, run)
    charge(P.decode_head(lay), led, site, links)
    charge_layers(P.decode_layer(lay, b), config.num_layers, led, site, links)
    tail = P.decode_logits(lay, b) + (P.decode_pick(lay, b) if greedy else [])
    charge(tail, led, site, links)
    return led


def decode_weight_words(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """Weight elements stored per core for decode (one copy, fused tiles, tied embeddings once)."""
    shapes = decode_tile_shapes(PhaseLayout(config, *mesh))
    return sum(weight_words_per_core(shapes).values())


def kv_words_per_token(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """K and V elements one token adds to one core of its row (all layers)."""
    return kv_slot_words(PhaseLayout(config, *mesh))


# ----------------------------------------------------------------------------------------------
# Prefill (time to first token)
# ----------------------------------------------------------------------------------------------


def prefill(
    config: ModelConfig,
    mesh: tuple[int, int],
    tokens: int,
    device: Device | str = "wse2",
    decode_mesh: tuple[int, int] | None = None,
    allreduce: AllreduceSpec = KTREE,
    ids=None,
    all_logits: bool = False,
    ledger: Ledger | None = None,
    links: tuple[int, int] = (1, 1),
) -> Ledger:
    """Ledger of prefilling ``tokens`` prompt tokens on ``mesh``, hand-off to decode included.

    Exactly the records :class:`llm.engine.prefill.MeshPrefiller` and the
    :class:`~llm.engine.handoff.Handoff`
    write to the prefill ledger (tests tie them on emulated meshes). The first token's final
    norm, LM head and pick run on the decode mesh: see :func:`first_token`.

    Parameters
    ----------
    mesh, decode_mesh : (Py, Px)
        Prefill and decode virtual meshes (decode defaults to the prefill mesh).
    allreduce : AllreduceSpec
        Of every reduction on the prefill mesh and of the hand-off's hidden-state gather.
    ids : int[tokens], optional
        The prompt: the embedding lookup's routes depend on it. Default: a fixed
        pseudo-random prompt.
    all_logits : bool
        Also price the LM head of every prompt token on the prefill mesh and its gathering.
    links : (int, int)
        Physical hops per logical link of the prefill stage's region (see
        :func:`llm.engine.kinds.charge`).
    """
    device = get_device(device)
    led = ledger if ledger is not None else Ledger(device)
    lay = PhaseLayout(config, *mesh)
    dlay = PhaseLayout(config, *(decode_mesh or mesh))
    if ids is None:
        ids = np.random.default_rng(0).integers(0, config.vocab_size, tokens)
    run = P.Pass(ids=tuple(int(t) for t in ids))
    led.memory("prefill/resident", prefill_resident_words(lay, tokens))
    site = Site(lay, allreduce, run)
    charge(P.prefill_head(lay, tokens), led, site, links)
    layer = P.prefill_layer(lay, tokens)
    charge_layers(layer, config.num_layers, led, site, links)
    Handoff(lay, dlay, tokens, allreduce).charge(led)
    if all_logits:
        charge(P.prefill_all_logits(lay, tokens), led, site)
    return led


def prefill_resident_words(lay: PhaseLayout, tokens: int) -> int:
    """Words per core prefill holds: its weights, the activations and every layer's K/V."""
    return prefill_weight_words(lay) + P.prefill_activation_words(lay, tokens)


def first_token(
    config: ModelConfig,
    mesh: tuple[int, int],
    device: Device | str = "wse2",
    allreduce: AllreduceSpec = KTREE,
    greedy: bool = True,
    ledger: Ledger | None = None,
) -> Ledger:
    """Decode-mesh records of the first token after prefill: final norm and LM head of the
    handed-off hidden state, then (``greedy``) the argmax on the mesh."""
    device = get_device(device)
    led = ledger if ledger is not None else Ledger(device)
    lay = PhaseLayout(config, *mesh)
    ops = P.decode_logits(lay) + (P.decode_pick(lay) if greedy else [])
    charge(ops, led, Site(lay, allreduce, P.Pass()))
    return led


def ttft(
    config: ModelConfig,
    prefill_mesh: tuple[int, int],
    tokens: int,
    decode_mesh: tuple[int, int] | None = None,
    device: Device | str = "wse2",
    **kwargs,
) -> dict:
    """Modeled time to first token: prefill (with the hand-off) plus the first pick.

    Returns
    -------
    dict
        ``seconds``, ``cycles``, ``prefill_cycles``, ``first_token_cycles``,
        ``compute_cycles``, ``comm_cycles``, ``peak_memory_bytes``, ``violations`` and the two
        ledgers (``prefill_ledger``, ``first_token_ledger``).
    """
    device = get_device(device)
    decode_mesh = decode_mesh or prefill_mesh
    pre = prefill(config, prefill_mesh, tokens, device, decode_mesh, **kwargs)
    first = first_token(
        config, decode_mesh, device, **{k: v for k, v in kwargs.items() if k == "allreduce"}
    )
    a, b = pre.totals(), first.totals()
    cycles = a.cycles + b.cycles
    return {
        "seconds": device.seconds(cycles),
        "cycles": cycles,
        "prefill_cycles": a.cycles,
        "first_token_cycles": b.cycles,
        "compute_cycles": a.compute_cycles + b.compute_cycles,
        "comm_cycles": a.comm_cycles + b.comm_cycles,
        "peak_memory_bytes": pre.peak_memory,
        "violations": pre.violations(),
        "prefill_ledger": pre,
        "first_token_ledger": first,
    }

"""Closed-form wafer cost of decoding one token and of prefill, for meshes too large to emulate.

:func:`prefill` (with :func:`first_token`, summed by :func:`ttft`) does the same for the prompt:
exactly the records :class:`llm.prefill.MeshPrefiller` writes.

:func:`decode_token` writes to a ledger exactly the records :class:`llm.decode.MeshDecoder`
writes when it runs a token (tests tie the two on emulated meshes), without touching any data:
paper-scale meshes (e.g. LLaMA3-8B on 420 x 420 cores) are priced in milliseconds.
"""
from __future__ import annotations

import math

import numpy as np

from meshrt.collectives import KTREE, AllreduceSpec, broadcast_cost
from meshrt.mesh import padded
from meshrt.ops.estimate import estimate_meshgemm
from meshrt.ops.gemv import estimate_meshgemv
from meshrt.ops.grouped import estimate_grouped_gemm_t, estimate_grouped_meshgemm
from meshrt.plmr import Device, Ledger, get_device
from meshrt.relayout import fetch_cost

from .config import ModelConfig
from .kvcache import balanced_counts
from .layout import PhaseLayout
from .plan import decode_tile_shapes, kv_slot_words, weight_words_per_core
from .prefill import record_handoff
from .prefill_weights import prefill_weight_words


def row_fill(policy: str, tokens: int, rows: int, prompt: int = 0) -> int:
    """Tokens in the fullest row of a cache holding ``tokens`` (``prompt`` of them from prefill)."""
    if tokens <= 0:
        return 0
    if policy == "shift":
        return math.ceil(tokens / rows)
    # concat: the prompt is spread like the shift policy, every later token joins the bottom row
    spread = balanced_counts(min(prompt, tokens), rows)
    return int(max(spread.max(initial=0), spread[-1] + tokens - min(prompt, tokens)))


def decode_token(config: ModelConfig, mesh: tuple[int, int], device: Device | str = "wse2",
                 context: int = 1, policy: str = "shift", prompt: int = 0, token_col: int = 0,
                 allreduce: AllreduceSpec = KTREE, greedy: bool = True,
                 ledger: Ledger | None = None, kv_capacity: int | None = None) -> Ledger:
    """Ledger of one decode step with ``context`` tokens in the cache after it.

    Parameters
    ----------
    mesh : (Py, Px)
        Decode virtual mesh.
    context : int
        Cache length including this token.
    token_col : int
        Mesh column holding the input token's embedding row (sets the lookup broadcast).
    greedy : bool
        Whether the next token is picked on the mesh (argmax) after this step.
    kv_capacity : int, optional
        Slots per core reserved for the cache (for the memory figure).
    """
    device = get_device(device)
    led = ledger if ledger is not None else Ledger(device)
    lay = PhaseLayout(config, *mesh)
    py, px = mesh
    ar = allreduce
    h_y = lay.hidden // py
    tq, tk, tf = lay.q // px, lay.kv // px, lay.ffn // px
    g, nq = config.group_size, config.num_heads
    fill = row_fill(policy, context, py, prompt)
    before = context - 1
    shifts = policy == "shift" and before % py != 0
    cap = kv_capacity if kv_capacity is not None else fill

    def norm(name):
        ar.charge(led, py, 1, name)
        led.record(name + "/scale", macs=2 * h_y)

    def gemv(name, m, n, input_axis):
        estimate_meshgemv(m, n, mesh, device, input_axis=input_axis, spec=ar, ledger=led,
                          name=name)

    led.memory("decode/resident", decode_weight_words(config, mesh) + 2 * config.num_layers * cap * tk)
    led.io(4, 1)
    led.charge("embed", broadcast_cost(px, token_col, h_y))
    for i in range(config.num_layers):
        norm(f"layer{i}/attn_norm")
        gemv(f"layer{i}/qkv", lay.hidden, (tq + 2 * tk) * px, "y")
        if shifts:
            led.record("kv_append/shift", words=2 * tk, hops=1)
        led.memory("kv_cache", 2 * config.num_layers * cap * tk)
        led.record(f"layer{i}/scores/local", macs=fill * tk * g)
        ar.charge(led, px, fill * nq, f"layer{i}/scores")
        ar.charge(led, py, nq, f"layer{i}/softmax_max")
        ar.charge(led, py, nq, f"layer{i}/softmax_sum")
        led.record(f"layer{i}/softmax", macs=3 * fill * nq)
        led.record(f"layer{i}/pv/local", macs=fill * tk * g)
        ar.charge(led, py, tk * g, f"layer{i}/pv")
        gemv(f"layer{i}/o", lay.q, lay.hidden, "x")
        norm(f"layer{i}/mlp_norm")
        gemv(f"layer{i}/gate_up", lay.hidden, 2 * lay.ffn, "y")
        led.record(f"layer{i}/swiglu", macs=4 * tf)
        gemv(f"layer{i}/down", lay.ffn, lay.hidden, "x")
    norm("final_norm")
    gemv("lm_head", lay.hidden, lay.vocab, "y")
    if greedy:
        ar.charge(led, px, 1, "argmax/value")
        ar.charge(led, px, 1, "argmax/index")
        led.io(4, 1)
    return led


def decode_weight_words(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """Weight elements stored per core for decode (one copy, fused tiles, tied embeddings once)."""
    shapes = decode_tile_shapes(PhaseLayout(config, *mesh))
    return sum(weight_words_per_core(shapes).values())


def kv_words_per_token(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """K and V elements one token adds to one core of its row (all layers)."""
    return kv_slot_words(PhaseLayout(config, *mesh))


def kv_capacity(config: ModelConfig, mesh: tuple[int, int], device: Device | str = "wse2",
                free_bytes: float | None = None) -> dict:
    """Tokens the decode KV cache can hold in each core's free memory, per policy.

    ``free_bytes`` defaults to the device memory minus the decode weights per core.
    """
    device = get_device(device)
    if free_bytes is None:
        free_bytes = device.mem_per_core - decode_weight_words(config, mesh) * device.word_bytes
    per_token = kv_words_per_token(config, mesh) * device.word_bytes
    slots = max(0, int(free_bytes // per_token))
    return {"free_bytes_per_core": free_bytes, "bytes_per_token_per_core": per_token,
            "concat": slots, "shift": slots * mesh[0]}


# ----------------------------------------------------------------------------------------------
# Prefill (time to first token)
# ----------------------------------------------------------------------------------------------

def prefill(config: ModelConfig, mesh: tuple[int, int], tokens: int,
            device: Device | str = "wse2", decode_mesh: tuple[int, int] | None = None,
            allreduce: AllreduceSpec = KTREE, ids=None, all_logits: bool = False,
            ledger: Ledger | None = None) -> Ledger:
    """Ledger of prefilling ``tokens`` prompt tokens on ``mesh``, hand-off to decode included.

    Exactly the records :meth:`llm.prefill.MeshPrefiller.run` writes to the prefill ledger
    (tests tie the two on emulated meshes). The first token's final norm, LM head and pick run
    on the decode mesh: see :func:`first_token`.

    Parameters
    ----------
    mesh, decode_mesh : (Py, Px)
        Prefill and decode virtual meshes (decode defaults to the prefill mesh).
    ids : int[tokens], optional
        The prompt: the embedding lookup's routes depend on it. Default: a fixed
        pseudo-random prompt.
    all_logits : bool
        Also price the LM head of every prompt token on the prefill mesh and its gathering.
    """
    device = get_device(device)
    led = ledger if ledger is not None else Ledger(device)
    lay = PhaseLayout(config, *mesh)
    dlay = PhaseLayout(config, *(decode_mesh or mesh))
    py, px = mesh
    ar = allreduce
    tp = padded(tokens, lay.unit)
    tl, sl = tp // py, tp // px
    hl, tk, tf = lay.hidden // px, lay.kv // px, lay.ffn // px
    g, nkv = config.group_size, config.num_kv_heads
    if ids is None:
        ids = np.random.default_rng(0).integers(0, config.vocab_size, tokens)
    ids = np.asarray(ids, dtype=np.int64)

    def norm(name):
        led.record(f"{name}/sumsq", macs=tl * hl)
        ar.charge(led, px, tl, name)
        led.record(f"{name}/scale", macs=2 * tl * hl)

    def gemm(name, k, n):
        estimate_meshgemm(tp, k, n, mesh, device, True, led, name)

    led.memory("prefill/resident", prefill_weight_words(lay) + tl * hl
               + 2 * config.num_layers * tl * tk)
    led.io(4 * tokens, 1)
    t = np.arange(tokens)
    led.charge("embed", fetch_cost(ids // (lay.vocab // py), t // tl, py, hl))
    for i in range(config.num_layers):
        norm(f"layer{i}/attn_norm")
        gemm(f"layer{i}/qkv", lay.hidden, lay.q + 2 * lay.kv)
        led.record(f"layer{i}/rope", macs=2 * tl * tk * (g + 1))
        estimate_grouped_gemm_t(g * tp, tp, lay.kv, nkv, mesh, device, led, f"layer{i}/scores")
        ar.charge(led, px, tl * g * nkv, f"layer{i}/softmax_max")
        ar.charge(led, px, tl * g * nkv, f"layer{i}/softmax_sum")
        led.record(f"layer{i}/softmax", macs=4 * tl * sl * g * nkv)
        estimate_grouped_meshgemm(g * tp, tp, lay.kv, nkv, mesh, device, False, led,
                                  f"layer{i}/pv")
        gemm(f"layer{i}/o", lay.q, lay.hidden)
        norm(f"layer{i}/mlp_norm")
        gemm(f"layer{i}/gate_up", lay.hidden, 2 * lay.ffn)
        led.record(f"layer{i}/swiglu", macs=4 * tl * tf)
        gemm(f"layer{i}/down", lay.ffn, lay.hidden)
    record_handoff(led, lay, dlay, tokens, ar)
    if all_logits:
        norm("final_norm")
        gemm("lm_head", lay.hidden, lay.vocab)
        led.io(tp * lay.vocab * 4, 2 * (py + px))   # float32 logits gathered by the host
    return led


def first_token(config: ModelConfig, mesh: tuple[int, int], device: Device | str = "wse2",
                allreduce: AllreduceSpec = KTREE, greedy: bool = True,
                ledger: Ledger | None = None) -> Ledger:
    """Decode-mesh records of the first token after prefill: final norm and LM head of the
    handed-off hidden state, then (``greedy``) the argmax on the mesh."""
    device = get_device(device)
    led = ledger if ledger is not None else Ledger(device)
    lay = PhaseLayout(config, *mesh)
    py, px = mesh
    ar = allreduce
    ar.charge(led, py, 1, "final_norm")
    led.record("final_norm/scale", macs=2 * (lay.hidden // py))
    estimate_meshgemv(lay.hidden, lay.vocab, mesh, device, input_axis="y", spec=ar, ledger=led,
                      name="lm_head")
    if greedy:
        ar.charge(led, px, 1, "argmax/value")
        ar.charge(led, px, 1, "argmax/index")
        led.io(4, 1)
    return led


def ttft(config: ModelConfig, prefill_mesh: tuple[int, int], tokens: int,
         decode_mesh: tuple[int, int] | None = None, device: Device | str = "wse2",
         **kwargs) -> dict:
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
    first = first_token(config, decode_mesh, device,
                        **{k: v for k, v in kwargs.items() if k == "allreduce"})
    a, b = pre.totals(), first.totals()
    cycles = a.cycles + b.cycles
    return {"seconds": device.seconds(cycles), "cycles": cycles, "prefill_cycles": a.cycles,
            "first_token_cycles": b.cycles, "compute_cycles": a.compute_cycles + b.compute_cycles,
            "comm_cycles": a.comm_cycles + b.comm_cycles, "peak_memory_bytes": pre.peak_memory,
            "violations": pre.violations(), "prefill_ledger": pre, "first_token_ledger": first}

"""Closed-form wafer cost of decoding one token, for meshes too large to emulate.

:func:`decode_token` writes to a ledger exactly the records :class:`llm.decode.MeshDecoder`
writes when it runs a token (tests tie the two on emulated meshes), without touching any data:
paper-scale meshes (e.g. LLaMA3-8B on 420 x 420 cores) are priced in milliseconds.
"""
from __future__ import annotations

import math

from meshrt.collectives import broadcast_cost
from meshrt.ops.gemv import estimate_meshgemv, record_allreduce
from meshrt.plmr import Device, Ledger, get_device

from .config import ModelConfig
from .kvcache import balanced_counts
from .layout import PhaseLayout


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
                 algo: str = "ktree", groups: int | None = None, levels: int = 2,
                 greedy: bool = True, ledger: Ledger | None = None,
                 kv_capacity: int | None = None) -> Ledger:
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
    ar = dict(algo=algo, groups=groups, levels=levels)
    h_y = lay.hidden // py
    tq, tk, tf = lay.q // px, lay.kv // px, lay.ffn // px
    g, nq = config.group_size, config.num_heads
    fill = row_fill(policy, context, py, prompt)
    before = context - 1
    shifts = policy == "shift" and before % py != 0
    cap = kv_capacity if kv_capacity is not None else fill

    def norm(name):
        record_allreduce(led, py, 1, name, **ar)
        led.record(name + "/scale", macs=2 * h_y)

    def gemv(name, m, n, input_axis):
        estimate_meshgemv(m, n, mesh, device, input_axis=input_axis, ledger=led, name=name, **ar)

    led.memory("decode/resident", decode_weight_words(config, mesh) + 2 * config.num_layers * cap * tk)
    led.io(4, 1)
    cost = broadcast_cost(px, token_col, h_y)
    led.record("embed", macs=cost["macs"], words=cost["words"], hops=cost["hops"],
               routings=cost["routings"], overlap=False)
    led.routes("embed", cost["routes"])
    for i in range(config.num_layers):
        norm(f"layer{i}/attn_norm")
        gemv(f"layer{i}/qkv", lay.hidden, (tq + 2 * tk) * px, "y")
        if shifts:
            led.record("kv_append/shift", words=2 * tk, hops=1)
        led.memory("kv_cache", 2 * config.num_layers * cap * tk)
        led.record(f"layer{i}/scores/local", macs=fill * tk * g)
        record_allreduce(led, px, fill * nq, f"layer{i}/scores", **ar)
        record_allreduce(led, py, nq, f"layer{i}/softmax_max", **ar)
        record_allreduce(led, py, nq, f"layer{i}/softmax_sum", **ar)
        led.record(f"layer{i}/softmax", macs=3 * fill * nq)
        led.record(f"layer{i}/pv/local", macs=fill * tk * g)
        record_allreduce(led, py, tk * g, f"layer{i}/pv", **ar)
        gemv(f"layer{i}/o", lay.q, lay.hidden, "x")
        norm(f"layer{i}/mlp_norm")
        gemv(f"layer{i}/gate_up", lay.hidden, 2 * lay.ffn, "y")
        led.record(f"layer{i}/swiglu", macs=4 * tf)
        gemv(f"layer{i}/down", lay.ffn, lay.hidden, "x")
    norm("final_norm")
    gemv("lm_head", lay.hidden, lay.vocab, "y")
    if greedy:
        record_allreduce(led, px, 1, "argmax/value", **ar)
        record_allreduce(led, px, 1, "argmax/index", **ar)
        led.io(4, 1)
    return led


def decode_weight_words(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """Weight elements stored per core for decode (one copy, fused tiles, tied embeddings once)."""
    lay = PhaseLayout(config, *mesh)
    py, px = mesh
    h_y = lay.hidden // py
    tq, tk, tf, tv = lay.q // px, lay.kv // px, lay.ffn // px, lay.vocab // px
    per_layer = 2 * h_y + h_y * (tq + 2 * tk) + tq * h_y + h_y * 2 * tf + tf * h_y
    if config.attention_bias:
        per_layer += tq + 2 * tk
    if config.attention_out_bias:
        per_layer += h_y
    if config.mlp_bias:
        per_layer += 2 * tf + h_y
    total = config.num_layers * per_layer + tv * h_y + h_y + tk + tk * config.num_kv_heads
    if not config.tie_word_embeddings:
        total += h_y * tv
    return total


def kv_words_per_token(config: ModelConfig, mesh: tuple[int, int]) -> int:
    """K and V elements one token adds to one core of its row (all layers)."""
    lay = PhaseLayout(config, *mesh)
    return 2 * config.num_layers * (lay.kv // mesh[1])


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

"""``python -m llm generate``: a prompt in, tokens streamed out, wall and modeled wafer metrics.

Rank 0 is the host: it reads the prompt, streams tokens to stdout and prints the summary. Every
rank runs the mesh. Metrics use the names serving people read: TTFT (time to first token), TPOT
(time per output token after the first), tokens/s, and TPR = 1/TPOT (the paper's throughput per
request), each measured on this machine (wall clock) and modeled for the wafer (PLMR ledger).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from meshrt import runtime
from meshrt.collectives import AllreduceSpec
from meshrt.mesh import MeshError, parse_grid

from .sampling import Sampler


@dataclass
class Generation:
    """What one request produced and how long it took."""

    prompt_ids: list
    new_ids: list = field(default_factory=list)
    stopped_by: str = "max_new_tokens"
    ttft_s: float = 0.0
    decode_s: float = 0.0
    modeled_prefill_s: float = 0.0
    modeled_decode_s: float = 0.0

    def metrics(self) -> dict:
        n = len(self.new_ids)
        tpot = self.decode_s / (n - 1) if n > 1 else float("nan")
        m_tpot = self.modeled_decode_s / (n - 1) if n > 1 else float("nan")
        total = self.ttft_s + self.decode_s
        return {"prompt_tokens": len(self.prompt_ids), "new_tokens": n,
                "stopped_by": self.stopped_by,
                "ttft_s": self.ttft_s, "tpot_s": tpot, "tokens_per_s": n / total if total else 0.0,
                "modeled_ttft_s": self.modeled_prefill_s,
                "modeled_tpot_s": m_tpot,
                "modeled_tpr": (1.0 / m_tpot) if n > 1 and m_tpot > 0 else float("nan"),
                "modeled_end_to_end_tpr": n / (self.modeled_prefill_s + self.modeled_decode_s)
                if n else float("nan")}


def generate(model, prompt_ids: list, max_new_tokens: int, sampler: Sampler | None = None,
             stop_ids=(), on_token=None, kv_capacity: int | None = None,
             fresh: bool = True) -> Generation:
    """Prefill ``prompt_ids``, then decode up to ``max_new_tokens`` tokens.

    The first new token comes from the prompt's last logits; TTFT covers prefill and that pick.
    ``on_token(id)`` is called on every rank as each token is known (rank 0 prints it). If the
    KV cache fills up, generation ends with ``stopped_by == "kv_full"`` and keeps its tokens.
    ``fresh=False`` keeps the KV cache: ``prompt_ids`` continue the tokens already in it, at
    the positions that follow (a chat's next turn; the caller sized the cache).
    """
    from .kvcache import ContextFullError
    led = model.ledgers()
    for ledger in led.values():
        ledger.reset()
    gen = Generation(list(prompt_ids))
    stop_ids = set(int(s) for s in stop_ids)
    if fresh or model.decoder is None:
        model.start(kv_capacity or model.capacity_for(len(prompt_ids) + max_new_tokens))
    t0 = time.perf_counter()
    logits = model.prefill(list(prompt_ids))
    token = model.pick(logits, sampler)
    gen.ttft_s = time.perf_counter() - t0
    prefill_cycles = led["prefill"].cycles + led["decode"].cycles
    gen.modeled_prefill_s = led["decode"].device.seconds(prefill_cycles)
    decode_start = led["decode"].cycles
    t1 = time.perf_counter()
    while True:
        gen.new_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in stop_ids:
            gen.stopped_by = "stop_token"
            break
        if len(gen.new_ids) >= max_new_tokens:
            break
        if model.position >= model.config.max_position_embeddings:
            gen.stopped_by = "context_full"
            break
        try:
            logits = model.decode(token)
        except ContextFullError:        # raised alike on every rank, before any communication
            gen.stopped_by = "kv_full"
            break
        token = model.pick(logits, sampler)
    gen.decode_s = time.perf_counter() - t1
    gen.modeled_decode_s = led["decode"].device.seconds(led["decode"].cycles - decode_start)
    return gen


def mesh_arg(value, what: str = "virtual mesh"):
    """``None``, ``"4x4"`` or ``(4, 4)`` -> ``None`` or ``(4, 4)``."""
    if value is None or isinstance(value, tuple):
        return value
    return parse_grid(value, what)


def load_model(args, comm):
    """The :class:`MeshModel` named by ``--model`` (a shard set or an HF model directory)."""
    from .model import MeshModel
    path = args.model
    kw = dict(kv_policy=getattr(args, "kv_policy", "shift"), device=getattr(args, "device", "wse2"),
              allreduce=AllreduceSpec(getattr(args, "allreduce", "ktree"),
                                      getattr(args, "groups", None)),
              emulation=getattr(args, "emulation", "aggregated"))
    ranks = mesh_arg(getattr(args, "ranks", None))
    dmesh = mesh_arg(getattr(args, "decode_mesh", None))
    pmesh = mesh_arg(getattr(args, "prefill_mesh", None))
    from .preflight import agree, model_kind
    if agree(comm, model_kind, path) == "shards":
        return MeshModel.from_shards(path, comm, decode_mesh=dmesh, prefill_mesh=pmesh,
                                     ranks=ranks, verify=getattr(args, "verify", True), **kw)
    from .checkpoint import load_checkpoint, storage_dtype
    config, weights = agree(comm, load_checkpoint, path, lazy=True,
                            max_context=getattr(args, "max_context", None))
    size = 1 if comm is None else comm.Get_size()
    if dmesh is None:
        from meshrt.mesh import default_rank_grid
        ry, rx = ranks or default_rank_grid(size)
        dmesh = (2 * ry, 2 * rx)
    return MeshModel.from_weights(config, weights, comm, decode_mesh=dmesh, prefill_mesh=pmesh,
                                  ranks=ranks, storage=storage_dtype(weights), **kw)


def _prompt_ids(args, tokenizer, config=None) -> list:
    from .preflight import prompt_ids
    return prompt_ids(args, tokenizer, config)


def _stop_ids(args, tokenizer, config) -> set:
    from .preflight import stop_ids
    return stop_ids(args, tokenizer, config)


def run(args) -> int:
    """Entry point of ``python -m llm generate``."""
    from .preflight import check_kv_capacity, prepare
    from .tokenizer import StreamDecoder
    comm = runtime.world()
    rank, size = runtime.rank_and_size(comm)
    log = runtime.setup_logging(comm, name="llm")
    try:            # every value is checked before any weight is read
        sampler = Sampler(getattr(args, "temperature", 0.0), getattr(args, "top_k", 0),
                          getattr(args, "top_p", 1.0), getattr(args, "seed", None))
    except ValueError as e:
        raise runtime.UsageError(str(e)) from None
    if getattr(args, "system", None) is not None and getattr(args, "chat", None) is None:
        raise runtime.UsageError("--system goes with --chat")
    request = prepare(args, comm if size > 1 else None)
    tokenizer, ids, stop = request.tokenizer, request.ids, request.stop
    try:
        model = load_model(args, comm if size > 1 else None)
    except MeshError as e:
        raise runtime.UsageError(str(e)) from None
    wrap = comm if size > 1 else None
    if getattr(args, "batch", None):
        from .batch import run_batch
        return run_batch(args, model, tokenizer, wrap, log,
                         lambda ids, gen: result_record(model, tokenizer, ids, gen),
                         lambda: _chat_template(args.model))
    if getattr(args, "chat", None) is not None:
        from .chat import chat_prompt_ids
        ids = chat_prompt_ids(args.model, tokenizer, args.chat, getattr(args, "system", None))
        if len(ids) + args.max_new_tokens > model.config.max_position_embeddings:
            raise runtime.UsageError(
                f"prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds "
                f"the model context of {model.config.max_position_embeddings} tokens")
    capacity = check_kv_capacity(model, len(ids), args.max_new_tokens,
                                 getattr(args, "kv_capacity", None), log)
    dl, pl = model.layouts["decode"], model.layouts["prefill"]
    log.info(f"model {model.config.name or model.config.family}: {model.config.num_layers} layers; "
             f"prefill on {pl.py}x{pl.px}, decode on {dl}; {len(ids)} prompt tokens")
    stream = rank == 0 and not getattr(args, "no_stream", False) and not getattr(args, "json", False)
    streamer = StreamDecoder(tokenizer) if tokenizer is not None else None

    def on_token(t):
        if stream:       # without a tokenizer the ids themselves are the output
            sys.stdout.write(streamer.push(t) if streamer else f"{t} ")
            sys.stdout.flush()

    try:
        gen = generate(model, ids, args.max_new_tokens, sampler, stop, on_token, capacity)
    except FloatingPointError as e:     # non-finite logits: the model or its weights are broken
        raise runtime.UsageError(str(e)) from None
    if stream:
        sys.stdout.write((streamer.flush() if streamer else "") + "\n")
    out = result_record(model, tokenizer, ids, gen)
    for v in out["violations"] if rank == 0 else ():  # the same on every rank: say it once
        log.warning(f"PLMR: {v}")   # the emulator ran it; a real wafer of this device could not
    if rank == 0:
        if getattr(args, "json", False):
            print(json.dumps(out))
        elif not getattr(args, "quiet", False):
            print(format_metrics(out, model.decode_fabric.ledger.device.name), file=sys.stderr)
    return 0


def result_record(model, tokenizer, prompt_ids: list, gen: Generation) -> dict:
    """The ``generate --json`` record of one finished request (also a ``--batch`` result)."""
    dl, pl = model.layouts["decode"], model.layouts["prefill"]
    violations = sorted({v for led in model.ledgers().values() for v in led.violations()})
    return {"prompt_ids": list(prompt_ids), "new_ids": gen.new_ids,
            "text": None if tokenizer is None else tokenizer.decode(gen.new_ids),
            **gen.metrics(), "violations": violations,
            "decode_mesh": [dl.py, dl.px], "prefill_mesh": [pl.py, pl.px],
            "ranks": [dl.ry, dl.rx], "device": model.decode_fabric.ledger.device.name,
            "kv_policy": model.kv_policy}


def _chat_template(model_path):
    from .chat_template import ChatTemplate
    return ChatTemplate.from_model_dir(model_path)


def format_metrics(m: dict, device: str) -> str:
    return (f"{m['new_tokens']} tokens ({m['stopped_by']}): "
            f"TTFT {m['ttft_s'] * 1e3:.1f} ms, TPOT {m['tpot_s'] * 1e3:.2f} ms, "
            f"{m['tokens_per_s']:.1f} tok/s on this machine | modeled {device}: "
            f"TTFT {m['modeled_ttft_s'] * 1e3:.4f} ms, TPOT {m['modeled_tpot_s'] * 1e3:.4f} ms, "
            f"TPR {m['modeled_tpr']:.1f} tok/s")

"""Generation on the mesh: load a model, prefill a prompt, decode tokens, report the metrics.

The command (``python -m llm generate``, :mod:`llm.cli.generate`) reads the prompt on rank 0,
streams tokens and prints the summary; every rank runs the mesh. Metrics use the names
serving people read: TTFT (time to first token), TPOT (time per output token after the first),
tokens/s, and TPR = 1/TPOT (the paper's throughput per request), each measured on this
machine (wall clock) and modeled for the wafer (PLMR ledger).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshrt.runtime import ControlPlane

from ..text.sampling import Sampler
from .options import ModelSource


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
        """Wall-clock and modeled figures of this generation. A time per token needs two new
        tokens: with one, ``tpot_s``, ``modeled_tpot_s`` and ``modeled_tpr`` are ``None``
        (JSON ``null``)."""
        n = len(self.new_ids)
        tpot = self.decode_s / (n - 1) if n > 1 else None
        m_tpot = self.modeled_decode_s / (n - 1) if n > 1 else None
        total = self.ttft_s + self.decode_s
        modeled_total = self.modeled_prefill_s + self.modeled_decode_s
        return {
            "prompt_tokens": len(self.prompt_ids),
            "new_tokens": n,
            "stopped_by": self.stopped_by,
            "ttft_s": self.ttft_s,
            "tpot_s": tpot,
            "tokens_per_s": n / total if total else 0.0,
            "modeled_ttft_s": self.modeled_prefill_s,
            "modeled_tpot_s": m_tpot,
            "modeled_tpr": 1.0 / m_tpot if m_tpot else None,
            "modeled_end_to_end_tpr": n / modeled_total if n and modeled_total else None,
        }


def generate(
    model,
    prompt_ids: list,
    max_new_tokens: int,
    sampler: Sampler | None = None,
    stop_ids=(),
    on_token=None,
    kv_capacity: int | None = None,
    fresh: bool = True,
    stop=None,
) -> Generation:
    """Prefill ``prompt_ids``, then decode up to ``max_new_tokens`` tokens.

    The first new token comes from the prompt's last logits; TTFT covers prefill and that pick.
    ``on_token(id)`` is called on every rank as each token is known (rank 0 prints it). If the
    KV cache fills up, generation ends with ``stopped_by == "kv_full"`` and keeps its tokens.
    ``fresh=False`` keeps the KV cache: ``prompt_ids`` continue the tokens already in it, at
    the positions that follow (a chat's next turn; the caller sized the cache).
    ``stop()``, if given, is called on every rank before each decode step and must return the
    same answer on every rank (a chat's Ctrl-C, agreed on the control plane): ``True`` ends
    generation with ``stopped_by == "interrupted"``, keeping the tokens made.
    """
    from ..engine.kvcache import ContextFullError

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
        if stop is not None and stop():
            gen.stopped_by = "interrupted"
            break
        try:
            logits = model.decode(token)
        except ContextFullError:  # raised alike on every rank, before any communication
            gen.stopped_by = "kv_full"
            break
        token = model.pick(logits, sampler)
    gen.decode_s = time.perf_counter() - t1
    gen.modeled_decode_s = led["decode"].device.seconds(led["decode"].cycles - decode_start)
    return gen


def load_model(source: ModelSource, plane: ControlPlane):
    """The :class:`MeshModel` of ``source.path`` (a shard set or an HF model directory).

    The path is checked on every rank and the ranks agree on what it is before anything is
    read; an HF directory without a decode mesh gets 2x2 cores per rank. Collective over
    ``plane`` (a :class:`meshrt.runtime.ControlPlane`).
    """
    from ..engine.model import MeshModel
    from .preflight import agree, model_kind

    path, mesh, kw = source.path, source.mesh, source.run.model_kwargs()
    if agree(plane, model_kind, path) == "shards":
        return MeshModel.from_shards(
            path,
            plane,
            decode_mesh=mesh.decode,
            prefill_mesh=mesh.prefill,
            ranks=mesh.ranks,
            verify=source.verify,
            **kw,
        )
    from ..storage.checkpoint import load_checkpoint, storage_dtype

    config, weights = agree(plane, load_checkpoint, path, lazy=True, max_context=source.max_context)
    dmesh = mesh.decode
    if dmesh is None:
        from meshrt.mesh import default_rank_grid

        ry, rx = mesh.ranks or default_rank_grid(plane.size)
        dmesh = (2 * ry, 2 * rx)
    return MeshModel.from_weights(
        config,
        weights,
        plane,
        decode_mesh=dmesh,
        prefill_mesh=mesh.prefill,
        ranks=mesh.ranks,
        storage=storage_dtype(weights),
        **kw,
    )


def result_record(model, tokenizer, prompt_ids: list, gen: Generation) -> dict:
    """The ``generate --json`` record of one finished request (also a ``--batch`` result).

    Keys: the request (``prompt_ids``, ``new_ids``, ``text``), :meth:`Generation.metrics`
    (wall clock, and ``modeled_*`` from this run's PLMR ledger), ``violations`` (PLMR limits
    the run exceeded), ``wafer`` (the whole model on the wafer as ``llm estimate`` prices it,
    :func:`llm.cost.predict.modeled_wafer`), and what the ledger covered: ``layers_run``,
    ``decode_mesh`` and ``prefill_mesh`` ([rows, cols] of cores), ``ranks``, ``device``,
    ``kv_policy``.
    """
    from ..cost.predict import modeled_wafer

    dl, pl = model.layouts["decode"], model.layouts["prefill"]
    violations = sorted({v for led in model.ledgers().values() for v in led.violations()})
    wafer = modeled_wafer(
        model.config,
        (pl.py, pl.px),
        (dl.py, dl.px),
        len(prompt_ids),
        len(gen.new_ids),
        model.decode_fabric.ledger.device,
        model.kv_policy,
        model.allreduce,
    )
    return {
        "prompt_ids": list(prompt_ids),
        "new_ids": gen.new_ids,
        "text": None if tokenizer is None else tokenizer.decode(gen.new_ids),
        **gen.metrics(),
        "violations": violations,
        "wafer": wafer,
        "layers_run": model.config.num_layers,
        "decode_mesh": [dl.py, dl.px],
        "prefill_mesh": [pl.py, pl.px],
        "ranks": [dl.ry, dl.rx],
        "device": model.decode_fabric.ledger.device.name,
        "kv_policy": model.kv_policy,
    }


def violation_warning(violations, device: str) -> str | None:
    """One warning line for the PLMR limits a run's ledger broke (``None`` if none): the
    emulator ran it, but a wafer of ``device`` could not hold it as meshed, so this run's
    modeled times assume too much; ``llm plan`` lists the meshes that fit. (The whole-model
    figures, ``wafer``, are placed on the wafer and hold either way.)"""
    if not violations:
        return None
    return (
        f"PLMR: {'; '.join(violations)}: a {device} wafer could not hold this run's meshes, "
        "so its modeled times (this run's ledger) assume too much; python -m llm plan shows "
        "the meshes that fit"
    )


def format_metrics(m: dict, device: str) -> str:
    """The text summary of a :meth:`Generation.metrics` or :func:`result_record` record.

    Line 1: the wall clock of this machine, then the modeled ``device`` time from this run's
    PLMR ledger, i.e. every message and operation the emulator executed for the layers it ran
    on its meshes. Line 2 (when the record has ``wafer``): the whole model placed on the
    wafer as ``llm estimate`` prices it, in closed form and over as many pipeline stages and
    wafers as it needs (:func:`llm.cost.predict.modeled_wafer`). Their TPOTs agree when the
    estimate keeps the model on one stage; its TTFT is lower when both phases' weights fit the
    wafer together (no re-placement at the hand-off, which the run's ledger always prices), and
    stages add their hand-overs.
    """
    wall = (
        f"{m['new_tokens']} tokens ({m['stopped_by']}): "
        f"TTFT {m['ttft_s'] * 1e3:.1f} ms, TPOT {format_ms(m['tpot_s'], 2)}, "
        f"{m['tokens_per_s']:.1f} tok/s on this machine"
    )
    where = ""
    if "decode_mesh" in m:
        (dy, dx), (py, px) = m["decode_mesh"], m["prefill_mesh"]
        layers = f"{m['layers_run']} layers, " if "layers_run" in m else ""
        where = f" ({layers}decode {dy}x{dx}, prefill {py}x{px} cores)"
    ledger = (
        f"modeled {device}, this run's ledger{where}: "
        f"TTFT {m['modeled_ttft_s'] * 1e3:.4f} ms, TPOT {format_ms(m['modeled_tpot_s'], 4)}, "
        f"TPR {format_rate(m['modeled_tpr'])}, "
        f"end-to-end TPR {format_rate(m['modeled_end_to_end_tpr'])}"
    )
    text = f"{wall} | {ledger}"
    if "wafer" in m:
        text += "\n" + format_whole_model(m["wafer"], device)
    return text


def format_ms(seconds: float | None, digits: int) -> str:
    """``seconds`` in ms, or ``n/a`` for a figure one new token leaves undefined."""
    return "n/a (one new token)" if seconds is None else f"{seconds * 1e3:.{digits}f} ms"


def format_rate(per_s: float | None) -> str:
    """A rate in tokens/s, or ``n/a``."""
    return "n/a" if per_s is None else f"{per_s:.1f} tok/s"


def format_whole_model(w: dict, device: str) -> str:
    """The second summary line: :func:`llm.cost.predict.modeled_wafer`'s figures, named so that
    they cannot be mistaken for this run's ledger (or why the model cannot be placed)."""
    head = f"modeled {device}, whole model on the wafer (closed form, as llm estimate"
    if "error" in w:
        return f"{head}): not placeable: {w['error']}"
    st, n = w["stages"], w["wafers"]
    return (
        f"{head}; {st['prefill']}+{st['decode']} stages on {n} wafer{'s' if n > 1 else ''}): "
        f"TTFT {w['ttft_s'] * 1e3:.4f} ms, TPOT {w['tpot_s'] * 1e3:.4f} ms, "
        f"TPR {w['decode_tpr']:.1f} tok/s, end-to-end TPR {w['e2e_tpr']:.1f} tok/s"
    )

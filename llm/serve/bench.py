"""Benchmark of a model at real shapes on the emulated wafer, measured and modeled.

Random weights at a preset's real shapes (optionally only its first ``--layers`` layers, so that
paper-size meshes fit in this machine's memory), or a converted shard set. Reports, side by side:

* the emulator's wall time on this machine (TTFT, median TPOT, tokens/s);
* the modeled wafer time of the same run (PLMR ledger, ``--device``);
* the closed-form estimate for the *whole* model (all layers) at the same meshes and context:
  TTFT, TPOT, TPR, compute/communication split, weights per core, KV capacity per policy.
"""

from __future__ import annotations

import math
import statistics
import time

import numpy as np

from meshrt.plmr import get_device
from meshrt.runtime import ControlPlane, UsageError

from .generate import format_ms, format_rate, violation_warning
from .options import BenchOptions, ModelSource


def full_model_estimate(
    config, mesh, device, context: int, prompt: int, policy: str, allreduce, prefill_mesh=None
) -> dict:
    """The whole model's wafer figures for this run's config, meshes and lengths: exactly
    ``llm estimate``'s (:func:`llm.cost.predict.modeled_wafer`, one placement for all)."""
    from ..cost.predict import modeled_wafer

    return modeled_wafer(
        config, prefill_mesh or mesh, mesh, prompt, context - prompt, device, policy, allreduce
    )


def _check_meshes(device, dmesh, pmesh) -> None:
    """Meshes the wafer cannot hold are refused before anything is placed (``UsageError``)."""
    from ..cost.wafer import PlacementError, check_mesh

    for phase, mesh in (("decode", dmesh), ("prefill", pmesh)):
        try:
            check_mesh(device, tuple(mesh), phase)
        except PlacementError as e:
            raise UsageError(f"bench: {e}") from None


def _check_length(options: BenchOptions, config) -> None:
    """The timed request must fit the model's context (``UsageError`` on every rank if not)."""
    total, context = options.prompt_len + options.new_tokens, config.max_position_embeddings
    if total > context:
        raise UsageError(
            f"bench: --prompt-len {options.prompt_len} + --new-tokens {options.new_tokens} = "
            f"{total} tokens exceed {config.name}'s context of {context}"
        )


def _peak_rss_gib() -> float:
    """This process's peak resident set size so far (GiB)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def run_bench(options: BenchOptions, plane: ControlPlane, log) -> dict:
    """Place the model, run prefill + decode ``warmup + repeat`` times, return the record.

    Collective over ``plane``. The record holds the run's settings, the emulator's medians
    (``emulator``), the modeled figures of this run and the closed-form estimate of the whole
    model (``full_model_estimate``); :func:`format_report` prints it.
    """
    from ..engine.model import MeshModel
    from ..modeling.config import preset
    from ..storage.checkpoint import RandomWeights
    from .generate import generate, load_model

    size = plane.size
    device = get_device(options.run.device)
    policy, spec, emulation = (
        options.run.kv_policy,
        options.run.allreduce_spec(),
        options.run.emulation,
    )
    t0 = time.perf_counter()
    if options.model:  # a shard set on its own meshes (another one: error), or an HF directory
        from .preflight import agree, check_run, decode_mesh, model_kind

        kind = agree(plane, model_kind, options.model)
        source = ModelSource(options.model, options.mesh, options.run)
        check_run(options.run, agree(plane, decode_mesh, source, kind, size))
        model = load_model(ModelSource(options.model, options.mesh, options.run), plane)
        full = model.config
        _check_length(options, full)
        storage = model.config.dtype
        dmesh, pmesh = (
            (model.layouts[ph].py, model.layouts[ph].px) for ph in ("decode", "prefill")
        )
    else:
        from .preflight import check_run

        dmesh = options.mesh.decode or (8, 8)
        pmesh = options.mesh.prefill or dmesh
        check_run(options.run, dmesh)
        name = options.preset
        full = preset(name)
        if options.layers is not None and options.layers > full.num_layers:
            raise UsageError(
                f"bench: --layers {options.layers}: {name} has {full.num_layers} layers"
            )
        _check_length(options, full)
        _check_meshes(device, dmesh, pmesh)
        config = preset(name, layers=options.layers)
        log.info(
            f"placing random {name} ({config.num_layers}/{full.num_layers} layers) on "
            f"decode {dmesh[0]}x{dmesh[1]}, prefill {pmesh[0]}x{pmesh[1]}, {size} ranks"
        )
        storage = options.dtype or (
            config.dtype if config.dtype in ("float32", "float16", "bfloat16") else "float32"
        )
        weights = RandomWeights(config, options.seed)
        model = MeshModel.from_weights(
            config,
            weights,
            plane,
            decode_mesh=dmesh,
            prefill_mesh=pmesh,
            kv_policy=policy,
            device=device,
            allreduce=spec,
            emulation=emulation,
            storage=storage,
        )
    placing = plane.allreduce_max(time.perf_counter() - t0)
    log.info(f"placed in {placing:.1f} s ({storage} weights)")
    prompt_len, new = options.prompt_len, options.new_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, prompt_len).tolist()
    prompts = [ids] + [
        rng.integers(3, model.config.vocab_size, prompt_len).tolist()
        for _ in range(options.batch - 1)
    ]
    runs = []
    for i in range(options.warmup + options.repeat):
        plane.barrier()
        if options.batch > 1:
            if i >= options.warmup:
                runs.append(_batched_run(model, prompts, new))
            else:
                _batched_run(model, prompts, new)
            continue
        step_times = []
        last = [time.perf_counter()]

        def on_token(_):
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now

        gen = generate(model, ids, new, None, (), on_token)
        m = gen.metrics()
        m["median_tpot_s"] = statistics.median(step_times[1:]) if len(step_times) > 1 else None
        if i >= options.warmup:
            runs.append(m)
    med = {
        k: _median(r[k] for r in runs)
        for k in (
            "ttft_s",
            "tpot_s",
            "median_tpot_s",
            "tokens_per_s",
            "modeled_ttft_s",
            "modeled_tpot_s",
            "modeled_tpr",
        )
        + (("total_tokens_per_s", "modeled_total_tokens_per_s") if options.batch > 1 else ())
    }
    est = full_model_estimate(
        full, dmesh, device, prompt_len + new, prompt_len, policy, spec, pmesh
    )
    led = model.decode_fabric.ledger
    t = led.totals()
    violations = sorted({v for ledger in model.ledgers().values() for v in ledger.violations()})
    warning = violation_warning(violations, device.name)
    if warning and plane.is_root:  # the same on every rank: say it once
        log.warning(warning)
    return {
        "model": model.config.name,
        "layers_run": model.config.num_layers,
        "decode_mesh": list(dmesh),
        "prefill_mesh": list(pmesh),
        "ranks": size,
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "batch": options.batch,
        "device": device.name,
        "kv_policy": policy,
        "allreduce": spec.algo,
        "emulation": emulation,
        "weights_dtype": storage,
        "placing_s": placing,
        "peak_rss_gib_per_rank": plane.allreduce_max(_peak_rss_gib()),
        "emulator": med,
        "modeled_run_comm_fraction": t.comm_cycles / t.cycles if t.cycles else None,
        "modeled_peak_kib_per_core": led.peak_memory / 1024,
        "full_model_estimate": est,
    }


def _batched_run(model, prompts: list, new: int) -> dict:
    """The requests of ``prompts`` decoded together (one run): per-request medians of
    :meth:`Generation.metrics`, the total tokens/s of the run (wall clock) and of the wafer
    (one modeled step gives every request a token)."""
    from .scheduler import Job, run_continuous, slots_needed

    for ledger in model.ledgers().values():
        ledger.reset()
    jobs = [Job(k, p, new) for k, p in enumerate(prompts)]
    t0 = time.perf_counter()
    gens = run_continuous(model, jobs, len(jobs), slots_needed(model, jobs, None))
    wall = time.perf_counter() - t0
    per = [g.metrics() for g in gens]
    keys = ("ttft_s", "tpot_s", "tokens_per_s", "modeled_ttft_s", "modeled_tpot_s", "modeled_tpr")
    m = {k: _median(r[k] for r in per) for k in keys}
    m["median_tpot_s"] = m["tpot_s"]
    m["total_tokens_per_s"] = sum(len(g.new_ids) for g in gens) / wall
    tpr = m["modeled_tpr"]
    m["modeled_total_tokens_per_s"] = None if tpr is None else len(gens) * tpr
    return m


def _median(values) -> float | None:
    """The median of the defined figures (a time per token needs two new tokens: with one it
    is None or NaN in every run, and so is the median)."""
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(defined) if defined else None


def format_report(out: dict) -> str:
    """The :func:`run_bench` record as a few lines of text."""
    med, est = out["emulator"], out["full_model_estimate"]
    dmesh, device = out["decode_mesh"], out["device"]
    lines = [
        f"{out['model']}: {out['layers_run']} layers run, decode {dmesh[0]}x{dmesh[1]}"
        f", {out['ranks']} ranks, {out['prompt_tokens']}+{out['new_tokens']} tokens",
        f"  emulator : TTFT {med['ttft_s'] * 1e3:.1f} ms, TPOT {format_ms(med['tpot_s'], 2)}"
        f" ({med['tokens_per_s']:.1f} tok/s); peak RSS "
        f"{out['peak_rss_gib_per_rank']:.2f} GiB per rank",
        f"  modeled  : TTFT {med['modeled_ttft_s'] * 1e3:.4f} ms, TPOT "
        f"{format_ms(med['modeled_tpot_s'], 4)}, TPR {format_rate(med['modeled_tpr'])} "
        f"(this run, {device})",
    ]
    if out.get("batch", 1) > 1:
        lines.append(
            f"  batch {out['batch']}: per request TPOT {format_ms(med['tpot_s'], 2)}, "
            f"{med['total_tokens_per_s']:.1f} tok/s in all on this machine; modeled "
            f"{format_rate(med['modeled_total_tokens_per_s'])} in all ({device}, this run)"
        )
    from ..cost.predict import format_modeled_wafer

    lines.append("  " + format_modeled_wafer(est, device))
    return "\n".join(lines)

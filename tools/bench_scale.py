"""Paper-scale emulation benchmark (``make bench-scale``): JSON + PNG in ``--out``.

Runs ``python -m llm bench`` under ``mpiexec -n RANKS`` (random weights at the preset's real
shapes, one layer, held in the preset's 16-bit dtype) and collects, per run, the placing time,
the emulator's TTFT and median TPOT, the peak resident memory per rank and the modeled wafer
time of the same run:

* ``decode``: one LLaMA3-8B layer decoding on square meshes ``--sides`` (default 64..720); the
  prompt runs on a small prefill mesh so that the decode mesh is what is measured;
* ``prefill``: one LLaMA3-8B layer prefilling ``--prefill-tokens`` tokens on ``--prefill-side``;
* ``transformers``: a ~100M model against HF transformers in the same run
  (``tools/bench_vs_transformers.py`` in the oracle venv), when ``--oracle`` is given.

Then it checks the figures against the targets of the scale issue and plots emulator seconds
per token against the mesh side, with the modeled wafer time on a second axis. The machine is
shared and noisy: every figure is one run's median over its tokens; rerun before trusting a
small difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from meshrt.movers import DEFAULT_EMULATION, emulations
from meshrt.runtime import LOCAL_MPI_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPI_ENV = LOCAL_MPI_ENV

# (what, limit, unit) of each target of the issue; None = not applicable to that run.
TARGETS = {
    "decode-420": [("placing_s", 30.0, "s"), ("tpot_s", 2.0, "s"), ("peak_rss_gib", 4.0, "GiB")],
    "decode-720": [("tpot_s", 5.0, "s")],
    "prefill": [("ttft_s", 180.0, "s"), ("peak_rss_gib", 8.0, "GiB")],
    "transformers": [("tpot_ratio", 0.7, "x"), ("ttft_ratio", 1.5, "x")],
}


def llm_bench(ranks: int, args: list, timeout: float) -> dict:
    """One ``llm bench --json`` run; returns its JSON (or ``{"error": ...}``)."""
    py = os.path.join(ROOT, ".venv", "bin", "python")
    cmd = [py, "-m", "mpi4py", "-m", "llm", "bench", "--json"] + args
    if ranks > 1:
        cmd = [os.path.join(ROOT, ".venv", "bin", "mpiexec"), "-n", str(ranks)] + cmd
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            cmd,
            cwd=ROOT,
            env=dict(os.environ, **MPI_ENV),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(cmd[-14:])}
    if p.returncode:
        tail = p.stderr.strip().splitlines()[-3:]
        return {"error": f"exit {p.returncode}: {' | '.join(tail)}", "cmd": " ".join(cmd[-14:])}
    out = json.loads(p.stdout)
    out["wall_s"] = time.perf_counter() - t0
    return out


def summary(run: dict) -> dict:
    """The figures of one ``llm bench`` run that the targets and the plot use."""
    if "error" in run:
        return run
    em = {
        k: (None if isinstance(v, float) and v != v else v)  # NaN (no step) -> None
        for k, v in run["emulator"].items()
    }
    return {
        "placing_s": run["placing_s"],
        "ttft_s": em["ttft_s"],
        "tpot_s": em["median_tpot_s"],
        "peak_rss_gib": run["peak_rss_gib_per_rank"],
        "modeled_ttft_s": em["modeled_ttft_s"],
        "modeled_tpot_s": em["modeled_tpot_s"],
        "decode_mesh": run["decode_mesh"],
        "prefill_mesh": run["prefill_mesh"],
        "ranks": run["ranks"],
        "weights_dtype": run["weights_dtype"],
        "emulation": run["emulation"],
        "wall_s": run["wall_s"],
    }


def check(results: dict) -> list:
    """``(run, figure, value, limit, met)`` for every target with a measurement."""
    rows = []
    for key, targets in TARGETS.items():
        r = results.get(key)
        for what, limit, unit in targets:
            value = None if r is None or "error" in r else r.get(what)
            rows.append(
                {
                    "run": key,
                    "figure": what,
                    "value": value,
                    "limit": limit,
                    "unit": unit,
                    "met": None if value is None else value <= limit,
                }
            )
    return rows


def plot(results: dict, path: str, model: str = "LLaMA3-8B") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (make bench-scale installs it); no plot written")
        return False
    pts = sorted(
        (r["decode_mesh"][0], r["tpot_s"], r["modeled_tpot_s"])
        for k, r in results.items()
        if k.startswith("decode-") and "error" not in r and r.get("tpot_s")
    )
    if not pts:
        return False
    sides, emu, wafer = zip(*pts)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(sides, emu, "o-", color="tab:blue", label="emulator (this machine)")
    ax.set_xlabel("mesh side (cores), decode mesh side x side")
    ax.set_ylabel("emulator seconds per token", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(sides, [w * 1e6 for w in wafer], "s--", color="tab:red", label="modeled WSE-2")
    ax2.set_ylabel("modeled wafer time per token (us)", color="tab:red")
    ranks = next(
        r["ranks"] for k, r in results.items() if k.startswith("decode-") and "error" not in r
    )
    ax.set_title(f"{model}, one layer, decode, {ranks} MPI ranks")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="out/bench-scale", help="output directory")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--preset", default="llama3-8b", help="model shapes (one layer is run)")
    ap.add_argument(
        "--sides",
        default="64,128,256,420,720",
        help="decode mesh sides of the sweep (comma separated)",
    )
    ap.add_argument(
        "--small-prefill-side",
        type=int,
        default=64,
        help="prefill mesh of the decode sweep (the prompt is not what is measured)",
    )
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--prefill-side", type=int, default=660)
    ap.add_argument("--prefill-tokens", type=int, default=4096, help="0 skips the prefill run")
    ap.add_argument(
        "--emulation", default=DEFAULT_EMULATION, choices=emulations(), help="the emulator's mover"
    )
    ap.add_argument(
        "--oracle",
        default=None,
        help="python of the oracle venv (torch + transformers) for the comparison",
    )
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    results = {}

    def save():
        with open(os.path.join(args.out, "scale.json"), "w") as f:
            json.dump(
                {
                    "results": results,
                    "targets": check(results),
                    "note": "one run per configuration on a shared 2-core machine; "
                    "TPOT is the median over the run's tokens",
                },
                f,
                indent=2,
            )

    common = [
        "--preset",
        args.preset,
        "--layers",
        "1",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--emulation",
        args.emulation,
    ]
    for side in (int(s) for s in args.sides.split(",") if s):
        print(f"decode {side}x{side}, {args.ranks} ranks ...", flush=True)
        run = llm_bench(
            args.ranks,
            common
            + [
                "--decode-mesh",
                f"{side}x{side}",
                "--prefill-mesh",
                f"{args.small_prefill_side}x{args.small_prefill_side}",
                "--prompt-len",
                "8",
                "--new-tokens",
                str(args.new_tokens),
            ],
            args.timeout,
        )
        results[f"decode-{side}"] = summary(run)
        print(f"  {results[f'decode-{side}']}", flush=True)
        save()
    if args.prefill_tokens:
        s = args.prefill_side
        print(
            f"prefill {args.prefill_tokens} tokens on {s}x{s}, {args.ranks} ranks ...", flush=True
        )
        run = llm_bench(
            args.ranks,
            common
            + [
                "--decode-mesh",
                f"{s}x{s}",
                "--prefill-mesh",
                f"{s}x{s}",
                "--prompt-len",
                str(args.prefill_tokens),
                "--new-tokens",
                "1",
            ],
            args.timeout,
        )
        results["prefill"] = summary(run)
        print(f"  {results['prefill']}", flush=True)
        save()
    if args.oracle:
        print("llama-100m: emulator vs transformers ...", flush=True)
        cmd = [
            args.oracle,
            os.path.join(ROOT, "tools", "bench_vs_transformers.py"),
            "--ranks",
            str(args.ranks),
            "--mesh",
            "4x4",
            "--prompt-len",
            "43",
            "--new-tokens",
            "32",
            "--emulation",
            args.emulation,
            "--json",
        ]
        p = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=args.timeout,
            stdin=subprocess.DEVNULL,
        )
        if p.returncode:
            results["transformers"] = {"error": p.stderr.strip().splitlines()[-1:]}
        else:
            hf = json.loads(p.stdout.strip().splitlines()[-1])
            em = hf["emulator"][0]
            results["transformers"] = {
                "model": hf["preset"],
                "transformers_ttft_s": hf["transformers"]["ttft_s"],
                "transformers_tpot_s": hf["transformers"]["tpot_s"],
                "emulator_ttft_s": em["ttft_s"],
                "emulator_tpot_s": em["tpot_s"],
                "ranks": em["ranks"],
                "mesh": hf["mesh"],
                "emulation": em["emulation"],
                "tpot_ratio": em["tpot_s"] / hf["transformers"]["tpot_s"],
                "ttft_ratio": em["ttft_s"] / hf["transformers"]["ttft_s"],
            }
        print(f"  {results['transformers']}", flush=True)
        save()
    save()
    wrote = plot(results, os.path.join(args.out, "scale.png"), args.preset)
    print(f"\nresults in {args.out}/scale.json" + (" and scale.png" if wrote else ""))
    for row in check(results):
        v = "-" if row["value"] is None else f"{row['value']:.3g} {row['unit']}"
        met = {None: "not measured", True: "met", False: "NOT met"}[row["met"]]
        print(
            f"  {row['run']:<13} {row['figure']:<13} {v:>12}  (target <= {row['limit']:g}"
            f" {row['unit']}): {met}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

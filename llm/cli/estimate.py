"""``python -m llm estimate``: closed-form predictions of the wafer, no emulation, no weights.

One request (``--preset``, meshes, prompt and output lengths) as one JSON object; ``--sweep``
tabulates square meshes; ``--plot`` draws TPR against mesh side for the paper's four models;
``--paper-table`` writes the prediction table of the paper's settings (JSON and markdown);
``--breakdown`` shows where one layer's time goes; ``--calibration`` prints the device
constants and their residuals on the allowed points.
"""

from __future__ import annotations

import json
import os

from meshrt import runtime

from .common import subparser

PAPER_MODELS = ("llama3-8b", "llama2-13b", "codellama-34b", "qwen2-72b")
DECODE_SIDES = (420, 540, 660)
PREFILL_SIDES = (480, 600, 720)
E2E_RUNS = {"llama3-8b": (660, 360), "llama2-13b": (750, 375)}
E2E_LENGTHS = ((2048, 128), (4096, 128), (2048, 2048), (4096, 4096))
CONTEXT = 4096

DESCRIPTION = """\
python -m llm estimate: closed-form predictions of the wafer, no emulation, no weights.

One request (--preset, the two meshes, prompt and output lengths) as one JSON object; --sweep
tabulates square meshes; --plot draws TPR against mesh side for the paper's four models;
--paper-table writes the prediction table of the paper's settings (JSON and markdown);
--breakdown shows where one layer's time goes, kernel by kernel; --calibration prints the
device constants and their residuals on the allowed points.
"""

EPILOG = """\
examples:
  python -m llm estimate --preset llama3-8b --prefill-mesh 660x660 --decode-mesh 360x360 \\
      --prompt-len 4096 --new-tokens 128
  python -m llm estimate --preset qwen2-72b --sweep 420,540,660
  python -m llm estimate --calibration
  python -m llm estimate --preset qwen2-72b --decode-mesh 420x420 --breakdown
  python -m llm estimate --paper-table out/predict --plot out/predict/tpr.png

Decode TPR is 1/TPOT (TPOT: mean over new tokens 2..M, or the one step at context N when
M = 1); prefill TPR is N / TTFT; e2e TPR is M / (TTFT + all decode time). Models larger than
one wafer are priced as a subset of layers on one wafer, scaled per layer (reported as
"wafers" and "method"); the links between wafers are not priced (the paper gives no figure
for them), and "method" says so.
"""


def add_parser(sub):
    """Register ``estimate`` on the subcommand set ``sub``."""
    p = subparser(
        sub,
        "estimate",
        help="closed-form wafer predictions (TTFT, TPOT, TPR, KV capacity)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    p.add_argument("--preset", default=None, help="model preset (e.g. llama3-8b, qwen2-72b)")
    p.add_argument(
        "--prefill-mesh",
        default=None,
        metavar="PYxPX",
        help="prefill mesh (default: the decode mesh)",
    )
    p.add_argument("--decode-mesh", default=None, metavar="PYxPX", help="decode mesh")
    p.add_argument(
        "--prompt-len",
        type=int,
        default=CONTEXT,
        metavar="N",
        help=f"prompt tokens (default {CONTEXT})",
    )
    p.add_argument(
        "--new-tokens",
        type=int,
        default=1,
        metavar="M",
        help="generated tokens (default 1: one decode step at context N)",
    )
    p.add_argument(
        "--device",
        default="wse2",
        help="device preset, optionally with overrides: wse2:task_switch=0,...",
    )
    p.add_argument(
        "--policy",
        choices=["shift", "concat"],
        default="shift",
        help="KV cache policy of the decode steps",
    )
    p.add_argument(
        "--sweep",
        default=None,
        metavar="SIDES",
        help="comma-separated square mesh sides: decode and prefill TPR per side",
    )
    p.add_argument(
        "--plot",
        default=None,
        metavar="PNG",
        help="plot TPR against mesh side for the paper's four models (matplotlib)",
    )
    p.add_argument(
        "--paper-table",
        default=None,
        metavar="DIR",
        help="write predictions.json and predictions.md for the paper's settings",
    )
    p.add_argument(
        "--calibration",
        action="store_true",
        help="print the device constants and residuals on the allowed points",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="where one layer's time goes, kernel by kernel: a decode step at context N on "
        "the decode mesh and a prefill of N tokens on the prefill mesh (compute, "
        "communication and fixed cycles)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="B",
        help="B requests decoded together: per-request TPR, total tokens/s and KV capacity "
        "per request (one step at context N + M - 1 on the decode mesh)",
    )
    p.add_argument(
        "--batch-sweep",
        default=None,
        metavar="B1,B2,...",
        help="the same for each batch size (e.g. 1,2,4,...,128): a table for --preset on "
        "--decode-mesh, or for the paper's four models on 420x420 without them",
    )
    p.add_argument(
        "--batch-plot",
        default=None,
        metavar="PNG",
        help="with --batch-sweep: total tokens/s against per-request TPR, one curve per model",
    )
    p.add_argument("--json", action="store_true", help="print JSON (the default for one run)")
    return p


def batch_rows(models, mesh, sizes, context, device, policy="shift") -> list[dict]:
    """:func:`llm.cost.batch.batch_decode` of each model and batch size (errors as rows)."""
    from ..cost.batch import batch_decode
    from ..cost.wafer import PlacementError

    rows = []
    for name in models:
        config = _config(name)
        for b in sizes:
            row = {"model": name, "decode_mesh": list(mesh)}
            try:
                row.update(batch_decode(config, mesh, b, context, device, policy))
            except PlacementError as e:
                row.update(batch=b, error=str(e))
            rows.append(row)
    return rows


def batch_table(rows) -> str:
    """The rows of :func:`batch_rows` as text."""
    out = [
        f"{'model':<14s} {'B':>4s} {'step ms':>9s} {'TPR/request':>12s} {'total tok/s':>12s} "
        f"{'KV tokens/request':>18s}"
    ]
    for r in rows:
        if "error" in r:
            out.append(f"{r['model']:<14s} {r['batch']:4d}  {r['error']}")
            continue
        kv = f"{r['kv_capacity_per_request']}{'' if r['kv_fits'] else ' (< context)'}"
        out.append(
            f"{r['model']:<14s} {r['batch']:4d} {r['step_s'] * 1e3:9.4f} "
            f"{r['tpr_per_request']:12.1f} {r['total_tokens_per_s']:12.1f} {kv:>18s}"
        )
    return "\n".join(out)


def batch_plot(path: str, rows, device_name: str) -> None:
    """PNG of total tokens/s against per-request TPR, one curve per model."""
    from meshrt.bench import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == name and "error" not in r]
        ax.plot(
            [r["tpr_per_request"] for r in pts],
            [r["total_tokens_per_s"] for r in pts],
            marker="o",
            label=name,
        )
        for r in pts:
            ax.annotate(
                str(r["batch"]), (r["tpr_per_request"], r["total_tokens_per_s"]), fontsize=7
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("tokens/s per request (TPR)")
    ax.set_ylabel("tokens/s in all")
    ax.set_title(f"Modeled {device_name}: batched decode (labels: B)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def _mesh(text: str | None, what: str) -> tuple[int, int] | None:
    from meshrt.mesh import MeshError, parse_grid

    if text is None:
        return None
    try:
        return parse_grid(text, what)
    except MeshError as e:
        raise runtime.UsageError(str(e)) from None


def _config(name: str):
    from ..modeling.config import ConfigError, preset

    try:
        return preset(name)
    except ConfigError as e:
        raise runtime.UsageError(str(e)) from None


def one(
    preset_name, prefill_mesh, decode_mesh, prompt, new_tokens, device="wse2", policy="shift"
) -> dict:
    """:func:`llm.cost.predict.predict` for a preset name; placement errors become usage errors."""
    from ..cost.predict import predict
    from ..cost.wafer import PlacementError

    try:
        return predict(
            _config(preset_name), prefill_mesh, decode_mesh, prompt, new_tokens, device, policy
        )
    except (PlacementError, ValueError) as e:
        raise runtime.UsageError(f"estimate: {e}") from None


def sweep(preset_name: str, sides, device="wse2", context: int = CONTEXT) -> list[dict]:
    """Decode TPR (one step at ``context``) and prefill TPR (``context``-token prompt) per side."""
    from ..cost.predict import decode_tpr
    from ..cost.wafer import PlacementError

    config = _config(preset_name)
    rows = []
    for side in sides:
        row = {"model": preset_name, "side": side}
        try:
            row["decode_tpr"] = decode_tpr(config, (side, side), device, context)
            r = one(preset_name, (side, side), (side, side), context, 1, device)
            row.update(
                prefill_tpr=r["prefill_tpr"],
                ttft_s=r["ttft_s"],
                stages=r["stages"]["prefill"],
                wafers=r["wafers"],
            )
        except (PlacementError, runtime.UsageError) as e:
            row["error"] = str(e)
        rows.append(row)
    return rows


def paper_table(device="wse2") -> dict:
    """Predictions at the paper's settings: decode at 420/540/660 (4K context), prefill at
    480/600/720 (4096-token prompt), end to end at 660->360 (8B) and 750->375 (13B)."""
    from meshrt.plmr import get_device

    from ..cost.predict import decode_tpr

    dev = get_device(device)
    decode: dict[str, dict[int, float]] = {}
    prefill: dict[str, dict[int, dict]] = {}
    e2e: dict[str, dict[str, dict]] = {}
    out = {
        "device": dev.to_dict(),
        "context": CONTEXT,
        "decode": decode,
        "prefill": prefill,
        "e2e": e2e,
    }
    for name in PAPER_MODELS:
        config = _config(name)
        decode[name] = {s: decode_tpr(config, (s, s), device, CONTEXT) for s in DECODE_SIDES}
        prefill[name] = {}
        for s in PREFILL_SIDES:
            r = one(name, (s, s), (s, s), CONTEXT, 1, device)
            prefill[name][s] = {
                "prefill_tpr": r["prefill_tpr"],
                "ttft_s": r["ttft_s"],
                "stages": r["stages"]["prefill"],
                "wafers": r["wafers"],
            }
    for name, (pm, dm) in E2E_RUNS.items():
        e2e[name] = {}
        for n, m in E2E_LENGTHS:
            r = one(name, (pm, pm), (dm, dm), n, m, device)
            e2e[name][f"{n}/{m}"] = {
                k: r[k] for k in ("e2e_tpr", "ttft_s", "tpot_s", "decode_tpr", "stages", "wafers")
            }
            e2e[name][f"{n}/{m}"]["meshes"] = f"{pm}->{dm}"
    return out


def table_markdown(t: dict) -> str:
    """The :func:`paper_table` result as markdown tables."""
    lines = [
        f"Decode TPR (tokens/s, one step with {t['context']} cached tokens)",
        "",
        "| model | " + " | ".join(f"{s}x{s}" for s in DECODE_SIDES) + " |",
        "|---|" + "---:|" * len(DECODE_SIDES),
    ]
    for name, row in t["decode"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:.1f}" for s in DECODE_SIDES) + " |")
    lines += [
        "",
        f"Prefill TPR (tokens/s = prompt / TTFT, {t['context']}-token prompt; stages; wafers)",
        "",
        "| model | " + " | ".join(f"{s}x{s}" for s in PREFILL_SIDES) + " |",
        "|---|" + "---:|" * len(PREFILL_SIDES),
    ]
    for name, row in t["prefill"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{row[s]['prefill_tpr']:.1f} ({row[s]['stages']}; {row[s]['wafers']})"
                for s in PREFILL_SIDES
            )
            + " |"
        )
    lines += [
        "",
        "End-to-end TPR (tokens/s = M / (TTFT + decode time)), prompt/new tokens",
        "",
        "| model | meshes | " + " | ".join(f"{n}/{m}" for n, m in E2E_LENGTHS) + " |",
        "|---|---|" + "---:|" * len(E2E_LENGTHS),
    ]
    for name, row in t["e2e"].items():
        first = next(iter(row.values()))
        lines.append(
            f"| {name} | {first['meshes']} | "
            + " | ".join(f"{row[f'{n}/{m}']['e2e_tpr']:.1f}" for n, m in E2E_LENGTHS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(path: str, device="wse2", sides=range(300, 751, 30)) -> None:
    """PNG of decode and prefill TPR against mesh side for the paper's four models."""
    from meshrt.bench import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in PAPER_MODELS:
        rows = [r for r in sweep(name, list(sides), device) if "error" not in r]
        axes[0].plot(
            [r["side"] for r in rows], [r["decode_tpr"] for r in rows], marker=".", label=name
        )
        axes[1].plot(
            [r["side"] for r in rows], [r["prefill_tpr"] for r in rows], marker=".", label=name
        )
    for ax, what in zip(axes, ("decode TPR (1/TPOT), 4K context", "prefill TPR, 4K prompt")):
        ax.set_xlabel("mesh side (cores)")
        ax.set_ylabel("tokens/s")
        ax.set_yscale("log")
        ax.set_title(what)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    from meshrt.plmr import get_device

    fig.suptitle(f"Modeled {get_device(device).name} throughput per request (llm estimate)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def run(args, plane=None) -> int:
    from meshrt.plmr import get_device

    try:
        device = get_device(args.device)
    except ValueError as e:
        raise runtime.UsageError(f"estimate: {e}") from None
    if args.plot:
        from meshrt.bench import pyplot

        pyplot()  # before any output: a missing matplotlib is bad input
    did = False
    if args.batch is not None and args.batch < 1:
        raise runtime.UsageError(f"estimate: --batch must be >= 1, got {args.batch}")
    if args.batch_plot and not args.batch_sweep:
        raise runtime.UsageError("estimate: --batch-plot goes with --batch-sweep")
    if args.batch_sweep:
        try:
            sizes = [int(b) for b in args.batch_sweep.split(",") if b.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1:
            raise runtime.UsageError(
                f"estimate: --batch-sweep {args.batch_sweep!r}: expected batch sizes like 1,2,4"
            )
        if args.batch_plot:
            from meshrt.bench import pyplot

            pyplot()  # before any output: a missing matplotlib is bad input
        mesh = _mesh(args.decode_mesh, "decode mesh") or (DECODE_SIDES[0], DECODE_SIDES[0])
        models = [args.preset] if args.preset else list(PAPER_MODELS)
        context = args.prompt_len + args.new_tokens - 1
        rows = batch_rows(models, mesh, sizes, context, device, args.policy)
        print(json.dumps(rows, indent=1) if args.json else batch_table(rows))
        if args.batch_plot:
            batch_plot(args.batch_plot, rows, device.name)
            print(f"wrote {args.batch_plot}")
        return 0
    if args.calibration:
        from ..cost.calibration import report

        print(report(device))
        did = True
    if args.paper_table:
        t = paper_table(device)
        os.makedirs(args.paper_table, exist_ok=True)
        with open(os.path.join(args.paper_table, "predictions.json"), "w") as f:
            json.dump(t, f, indent=1)
        md = table_markdown(t)
        with open(os.path.join(args.paper_table, "predictions.md"), "w") as f:
            f.write(md)
        print(md)
        did = True
    if args.plot:
        plot(args.plot, device)
        print(f"wrote {args.plot}")
        did = True
    if args.sweep:
        if not args.preset:
            raise runtime.UsageError("estimate: --sweep needs --preset")
        try:
            sides = [int(s) for s in args.sweep.split(",") if s.strip()]
        except ValueError:
            sides = []
        if not sides or min(sides) < 1:
            raise runtime.UsageError(
                f"estimate: --sweep {args.sweep!r}: expected positive sides like 420,540,660"
            )
        rows = sweep(args.preset, sides, device, args.prompt_len)
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            print(
                f"{'side':>6s} {'decode TPR':>12s} {'prefill TPR':>12s} {'stages':>7s} "
                f"{'wafers':>7s}"
            )
            for r in rows:
                if "error" in r:
                    print(f"{r['side']:6d}  {r['error']}")
                else:
                    print(
                        f"{r['side']:6d} {r['decode_tpr']:12.1f} {r['prefill_tpr']:12.1f} "
                        f"{r['stages']:7d} {r['wafers']:7d}"
                    )
        did = True
    if not did or (args.preset and args.decode_mesh):
        if not args.preset or not args.decode_mesh:
            raise runtime.UsageError(
                "estimate: give --preset and --decode-mesh (or --sweep, "
                "--plot, --paper-table, --calibration)"
            )
        if args.prompt_len < 1 or args.new_tokens < 1:
            raise runtime.UsageError("estimate: --prompt-len and --new-tokens must be >= 1")
        dmesh = _mesh(args.decode_mesh, "decode mesh")
        pmesh = _mesh(args.prefill_mesh, "prefill mesh") or dmesh
        if args.breakdown:
            from ..cost.breakdown import format_breakdown, layer_breakdown

            assert pmesh is not None and dmesh is not None  # --decode-mesh was given
            b = layer_breakdown(
                _config(args.preset), pmesh, dmesh, args.prompt_len, device, args.policy
            )
            print(json.dumps(b, indent=1) if args.json else format_breakdown(b), end="")
            return 0
        r = one(args.preset, pmesh, dmesh, args.prompt_len, args.new_tokens, device, args.policy)
        if args.batch is not None:
            context = args.prompt_len + args.new_tokens - 1
            assert dmesh is not None  # --decode-mesh was given
            r["batch"] = batch_rows(
                [args.preset], dmesh, [args.batch], context, device, args.policy
            )[0]
        print(json.dumps(r, indent=None if args.json else 1))
    elif args.breakdown:
        raise runtime.UsageError("estimate: --breakdown needs --preset and --decode-mesh")
    return 0

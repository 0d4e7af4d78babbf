"""``python -m llm bench``: a model at real shapes, emulator wall time beside modeled wafer time."""

from __future__ import annotations

import json
import sys

from meshrt import runtime

from ..serve.options import BenchOptions
from .common import (
    WEIGHTS_NOTE,
    add_mesh_args,
    add_run_args,
    mesh_spec,
    non_negative,
    positive,
    run_options,
    subparser,
)


def add_parser(sub) -> None:
    p = subparser(
        sub,
        "bench",
        "time a model on the emulator and model its wafer time",
        "Run prefill and decode of a preset at real shapes with random weights (or a "
        "shard set) and report the emulator's wall time beside the modeled wafer "
        "time, plus a closed-form estimate for the whole model." + WEIGHTS_NOTE,
        "examples:\n"
        "  python -m llm bench --preset llama-100m --decode-mesh 8x8\n"
        "  mpiexec -n 4 python -m mpi4py -m llm bench --preset llama3-8b --layers 1 "
        "--decode-mesh 64x64 --json\n",
    )
    p.add_argument("--preset", default="llama-100m", help="model shapes (default llama-100m)")
    p.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="a converted shard set (run on the meshes it was converted for) or an HF model "
        "directory, instead of random preset weights",
    )
    p.add_argument(
        "--layers",
        type=positive,
        default=None,
        metavar="N",
        help="run only the first N layers (the estimate still covers all)",
    )
    add_mesh_args(
        p, None, " (default: a shard set's own; an HF directory 2x2 cores per rank; a preset 8x8)"
    )
    p.add_argument("--prompt-len", type=positive, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new-tokens", type=positive, default=16, help="decoded tokens (default 16)")
    add_run_args(p)
    p.add_argument("--seed", type=non_negative, default=0, help="seed of the random weights")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="how random weights are held in memory (kernels widen 16-bit words to "
        "float32 per tile); default: the preset's dtype (llama3-8b bfloat16, "
        "llama-100m float32). A shard set keeps its own dtype",
    )
    p.add_argument("--repeat", type=positive, default=3, help="timed runs, median reported")
    p.add_argument("--warmup", type=non_negative, default=1, help="untimed runs first (default 1)")
    p.add_argument(
        "--batch",
        type=positive,
        default=1,
        metavar="B",
        help="decode B requests together (each its own random prompt and KV cache): "
        "per-request TPOT beside the total tokens/s (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def options(args) -> BenchOptions:
    return BenchOptions(
        preset=args.preset,
        model=args.model,
        layers=args.layers,
        mesh=mesh_spec(args),
        run=run_options(args),
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        seed=args.seed,
        dtype=args.dtype,
        repeat=args.repeat,
        warmup=args.warmup,
        batch=args.batch,
    )


def run(args, plane) -> int:
    """Measure on every rank; rank 0 prints the record (``--json``) or a summary."""

    from ..serve.bench import format_report, run_bench

    log = runtime.setup_logging(plane, name="llm")
    out = run_bench(options(args), plane, log)
    if plane.is_root:
        print(json.dumps(out, indent=2) if args.json else format_report(out))
        sys.stdout.flush()
    return 0

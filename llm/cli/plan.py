"""``python -m llm plan``: per-core memory, KV capacity and the meshes that fit a device."""

from __future__ import annotations

import json

from meshrt import runtime

from .common import grid, grid_or_none, positive, subparser


def add_parser(sub) -> None:
    p = subparser(
        sub,
        "plan",
        "per-core memory, KV capacity and meshes that fit a device",
        "Pure arithmetic, no MPI needed: the placement every other command uses. Per phase "
        "its pipeline stages (regions, folds, remainder stages), what each core holds "
        "(weights, KV, buffers, free), the wafers it needs; the decode KV capacity under the "
        "shift and concat policies; whether prefill and decode coexist; the smallest square "
        "meshes that hold a phase in one stage. Sizes are the wafer's (2-byte words on "
        "WSE-2). Under mpiexec "
        "every rank reads its own copy of --model and all stop with one error unless "
        "they read the same model.",
        "examples:\n"
        "  python -m llm plan --preset llama3-8b --context 4096\n"
        "  python -m llm plan --preset llama2-13b --decode-mesh 720x720 "
        "--prefill-mesh 720x720 --device wse3\n",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--preset", default=None, help="model shapes by preset name (default llama3-8b)"
    )
    src.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="HF model directory or shard set (its config and meshes)",
    )
    p.add_argument(
        "--layers", type=positive, default=None, metavar="N", help="count only the first N layers"
    )
    p.add_argument(
        "--decode-mesh",
        type=grid("decode mesh"),
        default=None,
        metavar="PYxPX",
        help="decode mesh (default: the shard set's, else the smallest square fit)",
    )
    p.add_argument(
        "--prefill-mesh",
        type=grid("prefill mesh"),
        default=None,
        metavar="PYxPX",
        help="prefill mesh (default: the shard set's, else the decode mesh)",
    )
    p.add_argument(
        "--device", default="wse2", help="wse2 (default), wse3, or NAME:field=value,... overrides"
    )
    p.add_argument(
        "--context",
        type=positive,
        default=None,
        metavar="TOKENS",
        help="tokens of the request placed, half prompt and half output (default 4096)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def read_model(path) -> tuple:
    """``(config, meshes)`` of a shard set (``meshes``: phase -> its mesh, from the manifest)
    or of an HF model directory (no meshes). Reads only the manifest or ``config.json``."""
    from ..modeling.config import ModelConfig
    from ..serve.preflight import model_kind
    from ..storage.shards import read_manifest

    if model_kind(path) == "shards":
        m = read_manifest(path)
        meshes = {phase: tuple(p["mesh"]) for phase, p in m["phases"].items()}
        return ModelConfig.from_dict(m["config"]), meshes
    try:
        return ModelConfig.from_json(path), {}
    except NotImplementedError as e:  # a model feature this code does not support
        raise runtime.UsageError(f"{path}: {e}") from None


def run(args, plane) -> int:
    from ..cost.memory_budget import format_memory_budget, memory_budget
    from ..modeling.config import preset
    from ..serve.preflight import agree, digest, same_on_every_rank

    rank = plane.rank
    decode_mesh, prefill_mesh = grid_or_none(args.decode_mesh), grid_or_none(args.prefill_mesh)
    if args.model is not None:
        # every rank reads its own copy: they agree on a failure and on what they read, so a
        # model missing on one node stops every rank alike instead of one rank alone
        config, meshes = agree(plane, read_model, args.model)
        seen = digest([config.to_dict(), sorted(meshes.items())])
        same_on_every_rank(plane, f"has config and meshes of sha256 {seen}", "model")
        decode_mesh = decode_mesh or meshes.get("decode")
        prefill_mesh = prefill_mesh or meshes.get("prefill")
    else:
        config = preset(args.preset or "llama3-8b")
    if args.layers is not None:
        config = config.replace(num_layers=min(args.layers, config.num_layers))
    try:
        result = memory_budget(
            config,
            decode_mesh,
            prefill_mesh,
            args.device,
            args.context,
        )
    except ValueError as e:  # unknown device or device field
        raise runtime.UsageError(str(e)) from None
    if rank == 0:
        print(json.dumps(result, indent=1) if args.json else format_memory_budget(result))
    return 0

"""``python -m llm plan``: per-core memory, KV capacity and the meshes that fit a device."""

from __future__ import annotations

import json

from meshrt import runtime

from .common import grid, grid_or_none, kib, positive, subparser


def add_parser(sub) -> None:
    p = subparser(
        sub,
        "plan",
        "per-core memory, KV capacity and meshes that fit a device",
        "Pure arithmetic, no MPI: weights per core of each phase, KV bytes per token "
        "per core, KV capacity under the shift and concat policies, whether it fits "
        "the device's core memory, and the smallest square meshes that do. Sizes are "
        "the wafer's (2-byte words on WSE-2); activations are not counted.",
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
        "--kv-memory",
        type=kib,
        default=None,
        metavar="KIB",
        help="KiB per core for the KV cache (default: what the weights leave free)",
    )
    p.add_argument(
        "--context",
        type=positive,
        default=None,
        metavar="TOKENS",
        help="tokens the KV cache must hold for a mesh to count as fitting",
    )
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args, plane) -> int:
    from ..cost.memory_budget import format_memory_budget, memory_budget
    from ..modeling.config import ModelConfig, preset

    rank = plane.rank
    decode_mesh, prefill_mesh = grid_or_none(args.decode_mesh), grid_or_none(args.prefill_mesh)
    if args.model is not None:
        from pathlib import Path

        from ..storage.shards import MANIFEST_NAME, read_manifest

        if (Path(args.model) / MANIFEST_NAME).exists():
            m = read_manifest(args.model)
            config = ModelConfig.from_dict(m["config"])
            phases = m["phases"]
            decode_mesh = decode_mesh or tuple(phases["decode"]["mesh"])
            if prefill_mesh is None and "prefill" in phases:
                prefill_mesh = tuple(phases["prefill"]["mesh"])
        else:
            try:
                config = ModelConfig.from_json(args.model)
            except NotImplementedError as e:  # a model feature this code does not support
                raise runtime.UsageError(f"{args.model}: {e}") from None
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
            None if args.kv_memory is None else int(args.kv_memory * 1024),
            args.context,
        )
    except ValueError as e:  # unknown device or device field
        raise runtime.UsageError(str(e)) from None
    if rank == 0:
        print(json.dumps(result, indent=1) if args.json else format_memory_budget(result))
    return 0

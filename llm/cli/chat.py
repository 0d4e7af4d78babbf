"""``python -m llm chat``: an interactive multi-turn session (see :mod:`llm.chat`)."""
from __future__ import annotations

from .common import add_mesh_args, add_run_args, positive, subparser


def add_parser(sub) -> None:
    from ..chat import DEFAULT_CONTEXT
    p = subparser(
        sub, "chat", "interactive multi-turn chat with the model's chat template",
        "Talk to a chat model on the emulated wafer. Rank 0 reads one user turn per line from "
        "the terminal (or a pipe); every rank runs the mesh. The KV cache is kept across turns: "
        "each turn feeds only its new tokens, never an old turn again. Commands: /reset "
        "(new conversation), /exit (or end of input; under mpiexec, end piped input with "
        "/exit: Open MPI does not forward the end of input to rank 0).",
        "examples:\n"
        "  mpiexec -n 2 python -m mpi4py -m llm chat --model shards/smollm2\n"
        "  printf 'Hi!\\nWhat did I just say?\\n/exit\\n' | mpiexec -n 2 python -m mpi4py -m llm chat "
        "--model shards/smollm2 --json\n")
    p.add_argument("--model", metavar="PATH", required=True,
                   help="shard set (from convert) or HF model directory, with a chat template")
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="system message (default: the template's own, if any)")
    p.add_argument("--max-new-tokens", type=positive, default=256,
                   help="longest reply, in tokens (default 256)")
    p.add_argument("--context", type=positive, default=None, metavar="TOKENS",
                   help=f"tokens the session keeps in the KV cache (default "
                        f"{DEFAULT_CONTEXT} or the model's context if shorter); a turn that "
                        "does not fit starts a new conversation")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_mesh_args(p, None, " (default: as converted; for an HF directory 2x2 cores per rank)")
    add_run_args(p)
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of the shard files (sizes are still checked)")
    p.add_argument("--json", action="store_true",
                   help="one JSON line per turn on stdout (fed ids, cached count, reply ids, "
                        "text, metrics) instead of streamed text")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-turn timing lines")


def run(args, comm) -> int:
    from ..chat import run as chat_command
    return chat_command(args)

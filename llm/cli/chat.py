"""``python -m llm chat``: an interactive multi-turn session (see :mod:`llm.serve.chat`)."""

from __future__ import annotations

import json
import sys

from meshrt import runtime

from ..serve.options import ModelSource
from .common import (
    add_mesh_args,
    add_run_args,
    mesh_spec,
    non_negative,
    positive,
    probability,
    run_options,
    sampling_options,
    subparser,
    temperature,
)


def add_parser(sub) -> None:
    from ..serve.chat import DEFAULT_CONTEXT

    p = subparser(
        sub,
        "chat",
        "interactive multi-turn chat with the model's chat template",
        "Talk to a chat model on the emulated wafer. Rank 0 reads one user turn per line from "
        "the terminal (or a pipe); every rank runs the mesh. The KV cache is kept across turns: "
        "each turn feeds only its new tokens, never an old turn again. Commands: /reset "
        "(new conversation), /exit (or end of input; under mpiexec, end piped input with "
        "/exit: Open MPI does not forward the end of input to rank 0).",
        "examples:\n"
        "  mpiexec -n 2 python -m mpi4py -m llm chat --model shards/smollm2\n"
        "  printf 'Hi!\\nWhat did I just say?\\n/exit\\n' | mpiexec -n 2 python -m mpi4py -m llm chat "
        "--model shards/smollm2 --json\n",
    )
    p.add_argument(
        "--model",
        metavar="PATH",
        required=True,
        help="shard set (from convert) or HF model directory, with a chat template",
    )
    p.add_argument(
        "--system",
        metavar="TEXT",
        default=None,
        help="system message (default: the template's own, if any)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive,
        default=None,
        help="longest reply, in tokens (default 256, or half the session context if smaller)",
    )
    p.add_argument(
        "--context",
        type=positive,
        default=None,
        metavar="TOKENS",
        help=f"tokens the session keeps in the KV cache (default "
        f"{DEFAULT_CONTEXT} or the model's context if shorter); a turn that "
        "does not fit starts a new conversation",
    )
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument(
        "--top-k", type=non_negative, default=0, help="keep the k most likely tokens (0 = all)"
    )
    p.add_argument(
        "--top-p", type=probability, default=1.0, help="nucleus sampling mass, in (0, 1] (1 = off)"
    )
    p.add_argument("--seed", type=non_negative, default=0, help="sampling seed (default 0)")
    add_mesh_args(p, None, " (default: as converted; for an HF directory 2x2 cores per rank)")
    add_run_args(p)
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="skip the sha256 check of the shard files (sizes are still checked)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON line per turn on stdout (fed ids, cached count, reply ids, "
        "text, metrics) instead of streamed text",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no per-turn timing lines")


def read_line(plane, interactive: bool):
    """Rank 0 reads one line (``None`` at end of input); every rank gets it."""
    line = None
    if plane.is_root:
        if interactive:
            sys.stderr.write("you> ")
            sys.stderr.flush()
        text = sys.stdin.readline()
        line = None if text == "" else text.rstrip("\n")
    return plane.bcast(line)  # control plane: the user's turn


def run(args, plane) -> int:
    """The session: load the model once, then one turn per line read on rank 0."""
    from meshrt.mesh import MeshError

    from ..serve.chat import DEFAULT_CONTEXT, ChatSession
    from ..serve.generate import format_metrics, load_model
    from ..serve.preflight import prepare_chat
    from ..text.tokenizer import StreamDecoder

    rank = plane.rank
    log = runtime.setup_logging(plane, "WARNING" if args.quiet else "INFO", name="llm")
    try:
        sampler = sampling_options(args).sampler()
    except ValueError as e:
        raise runtime.UsageError(str(e)) from None
    source = ModelSource(args.model, mesh_spec(args), run_options(args), verify=args.verify)
    # path, config, tokenizer and template: checked and agreed on every rank before any weight
    checked, template = prepare_chat(source, plane)
    tokenizer = checked.tokenizer
    context = min(args.context or DEFAULT_CONTEXT, checked.config.max_position_embeddings)
    max_new_tokens = args.max_new_tokens or max(1, min(256, context // 2))
    if max_new_tokens >= context:
        raise runtime.UsageError(
            f"--max-new-tokens {max_new_tokens} must be smaller than "
            f"the session context of {context} tokens"
        )
    try:
        model = load_model(source, plane)
    except MeshError as e:
        raise runtime.UsageError(str(e)) from None
    session = ChatSession(
        model,
        tokenizer,
        template,
        sampler,
        model.config.eos_ids,
        max_new_tokens,
        context,
        args.system,
    )
    interactive = rank == 0 and sys.stdin.isatty()
    log.info(
        f"chat with {model.config.name or model.config.family}: context {context} tokens, "
        "/reset for a new conversation, /exit or end of input to stop"
    )
    turn_no = 0
    while True:
        line = read_line(plane, interactive)
        if line is None or line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            session.reset()
            log.info("new conversation")
            continue
        if not line.strip():
            continue
        turn_no += 1
        streamer = StreamDecoder(tokenizer)
        stream = rank == 0 and not args.json

        def on_token(t, streamer=streamer, stream=stream):
            if stream and t not in session.stop_ids:
                sys.stdout.write(streamer.push(t))
                sys.stdout.flush()

        turn = session.ask(line, on_token)
        gen = turn.generation
        if turn.reprefilled:
            log.info("the conversation was prefilled again from its start")
        if rank == 0:
            if args.json:
                reply = [t for t in gen.new_ids if t not in session.stop_ids]
                print(
                    json.dumps(
                        {
                            "turn": turn_no,
                            "fed_ids": turn.fed_ids,
                            "cached": turn.cached,
                            "reprefilled": turn.reprefilled,
                            "new_ids": gen.new_ids,
                            "text": tokenizer.decode(reply),
                            **gen.metrics(),
                        }
                    ),
                    flush=True,
                )
            else:
                sys.stdout.write(streamer.flush() + "\n")
                sys.stdout.flush()
                if not args.quiet:
                    print(
                        f"[{len(turn.fed_ids)} new prompt tokens, {turn.cached} reused from "
                        f"the cache] "
                        + format_metrics(gen.metrics(), model.decode_fabric.ledger.device.name),
                        file=sys.stderr,
                        flush=True,
                    )
    return 0

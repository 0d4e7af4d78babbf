"""``python -m llm chat``: an interactive multi-turn session (see :mod:`llm.serve.chat`).

As a terminal program: rank 0 reads the keyboard (under ``mpiexec`` too, see
:mod:`llm.cli.terminal`); ``/help`` and unknown ``/commands`` are answered there and never
reach the model; Ctrl-C stops the reply being generated (rank 0 sees it, and every rank learns
it through the control plane before its next decode step) and returns to the prompt; Ctrl-C
again at the prompt, Ctrl-D (end of input) or ``/exit`` ends the chat with exit code 0. While
rank 0 waits for a line, the other ranks sleep (:meth:`meshrt.runtime.ControlPlane.bcast_idle`).
"""

from __future__ import annotations

import json
import signal
import sys
import threading

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
        "each turn feeds only its new tokens, never an old turn again. Commands: /help, /reset "
        "(new conversation), /exit. Ctrl-C stops a reply; Ctrl-C again at the prompt, Ctrl-D "
        "or /exit leaves (exit code 0). Under mpiexec, end piped input with /exit: Open MPI "
        "does not forward the end of piped input to rank 0.",
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


HELP = """commands:
  /help    this list
  /reset   start a new conversation
  /exit    leave (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C while the model replies stops the reply. Any other line is your turn; start it
with // to send a line that begins with /."""
#: What rank 0 broadcasts for a line: ("say", text), ("reset", None), or None to end.
END = None


def parse_line(line: str):
    """``(action, text)`` of a typed line: ``("say", text)``, ``("reset", None)``, ``("end",
    None)``, ``("help", None)``, ``("unknown", command)`` or ``("skip", None)`` (blank)."""
    text = line.strip()
    if not text:
        return "skip", None
    if text.startswith("//"):
        return "say", line.lstrip()[1:]
    if not text.startswith("/"):
        return "say", line
    command = text.split()[0]
    if command in ("/exit", "/quit"):
        return "end", None
    if command == "/reset":
        return "reset", None
    if command in ("/help", "/?"):
        return "help", None
    return "unknown", command


class Keyboard:
    """Rank 0's side of the session: reading lines, and Ctrl-C (SIGINT).

    A Ctrl-C while the model replies sets :attr:`interrupted` (read at the next step
    boundary); at the prompt it interrupts the read. Two in a row (one during a reply or at
    the prompt, then one at the prompt) end the chat.

    Parameters
    ----------
    interactive : bool
        Whether a person types the lines (a prompt is shown).
    keys : llm.cli.terminal.Keys, optional
        Where the lines come from when ``mpiexec`` keeps the terminal and forwards the keys,
        Ctrl-C and Ctrl-D among them (:mod:`llm.cli.terminal`); else stdin, and Ctrl-C is
        SIGINT.
    """

    def __init__(self, interactive: bool, keys=None):
        self.interactive = interactive
        self.keys = keys
        self.interrupted = False
        self.at_prompt = False
        self.leave_on_ctrl_c = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame):
        if self.at_prompt:
            raise KeyboardInterrupt
        self.interrupted = True

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _read(self):
        """One line, ``None`` at end of input."""
        self.at_prompt = True
        try:
            if self.keys is not None:
                sys.stderr.write("you> ")
                sys.stderr.flush()
                return self.keys.read_line()
            if self.interactive and sys.stdout.isatty():
                try:
                    import readline  # noqa: F401 - line editing and history for input()
                except ImportError:
                    pass
                try:
                    return input("you> ")
                except EOFError:
                    return None
            if self.interactive:
                sys.stderr.write("you> ")
                sys.stderr.flush()
            text = sys.stdin.readline()
            return None if text == "" else text.rstrip("\n")
        finally:
            self.at_prompt = False

    def next_turn(self):
        """Read until a line for every rank: ``("say", text)``, ``("reset", None)`` or
        :data:`END`. Help and unknown commands are answered here."""
        while True:
            try:
                line = self._read()
            except KeyboardInterrupt:
                if self.leave_on_ctrl_c:
                    sys.stderr.write("\n")
                    return END
                self.leave_on_ctrl_c = True
                sys.stderr.write("\n(Ctrl-C again, Ctrl-D or /exit to leave)\n")
                continue
            if line is None:
                if self.interactive:
                    sys.stderr.write("\n")
                return END
            self.leave_on_ctrl_c = False
            action, text = parse_line(line)
            if action == "end":
                return END
            if action in ("say", "reset"):
                return action, text
            if action == "help":
                print(HELP, file=sys.stderr, flush=True)
            elif action == "unknown":
                print(
                    f"unknown command {text}; /help lists the commands (start a message "
                    "with // to send a line that begins with /)",
                    file=sys.stderr,
                    flush=True,
                )

    def stop_reply(self, plane):
        """``() -> bool`` for :meth:`~llm.serve.chat.ChatSession.ask`: whether Ctrl-C was
        pressed, rank 0's answer broadcast to every rank at each step boundary."""
        self.interrupted = False

        def pressed() -> bool:
            if self.keys is not None and self.keys.interrupted():
                self.interrupted = True
            return self.interrupted

        if plane.size == 1:
            return pressed
        return lambda: bool(plane.bcast(pressed()))  # control plane: rank 0's Ctrl-C


def read_turn(plane, keyboard: Keyboard | None):
    """Rank 0 reads the next turn (``keyboard``; ``None`` on the other ranks); every rank gets
    it, the others asleep while they wait (control plane)."""
    turn = keyboard.next_turn() if keyboard is not None else None
    return plane.bcast_idle(turn)


def _stop_on_other_ranks(plane):
    return lambda: bool(plane.bcast(None))  # control plane: rank 0's answer


def run(args, plane) -> int:
    """The session: load the model once, then one turn per line read on rank 0."""
    from .terminal import Terminal

    # under a launcher that reads the terminal, rank 0 reads it (itself or through the launcher)
    terminal = Terminal.adopt() if plane.is_root and plane.size > 1 else None
    try:
        return _run(args, plane, terminal)
    finally:
        if terminal is not None:
            terminal.release()


def _run(args, plane, terminal=None) -> int:
    from meshrt.mesh import MeshError

    from ..serve.chat import DEFAULT_CONTEXT, ChatSession
    from ..serve.generate import load_model
    from ..serve.preflight import prepare_chat

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
    # on a terminal rank 0 reads itself or through mpiexec; else it reads a pipe
    on_terminal = sys.stdin.isatty() or terminal is not None
    keys = "Ctrl-C stops a reply, Ctrl-D or /exit leaves" if on_terminal else "/exit leaves"
    log.info(
        f"chat with {model.config.name or model.config.family}: context {context} tokens; "
        f"/help for the commands, {keys}"
    )
    forwarded = terminal.keys if terminal is not None else None
    keyboard = Keyboard(on_terminal, forwarded) if rank == 0 else None
    try:
        _session(args, plane, session, tokenizer, model, keyboard, log)
    finally:
        if keyboard is not None:
            keyboard.close()
    return 0


def _session(args, plane, session, tokenizer, model, keyboard, log) -> None:
    from ..serve.generate import format_metrics
    from ..text.tokenizer import StreamDecoder

    rank = plane.rank
    turn_no = 0
    while True:
        request = read_turn(plane, keyboard)
        if request is END:
            break
        action, line = request
        if action == "reset":
            session.reset()
            log.info("new conversation")
            continue
        turn_no += 1
        streamer = StreamDecoder(tokenizer)
        stream = rank == 0 and not args.json

        def on_token(t, streamer=streamer, stream=stream):
            if stream and t not in session.stop_ids:
                sys.stdout.write(streamer.push(t))
                sys.stdout.flush()

        stop = keyboard.stop_reply(plane) if keyboard is not None else _stop_on_other_ranks(plane)
        try:
            turn = session.ask(line, on_token, stop)
        except runtime.UsageError as e:  # alike on every rank: the render and ids are agreed
            turn_no -= 1
            if rank == 0:  # a turn too long for the context, a template that refuses it
                print(f"[not sent: {e}]", file=sys.stderr, flush=True)
            continue
        gen = turn.generation
        if stream:  # the reply's end, before any note about it
            sys.stdout.write(streamer.flush() + "\n")
            sys.stdout.flush()
        if turn.reprefilled:
            log.info("the conversation was prefilled again from its start")
        if gen.stopped_by == "interrupted" and keyboard is not None:
            keyboard.leave_on_ctrl_c = True
            print("[reply stopped; Ctrl-C again to leave]", file=sys.stderr, flush=True)
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
            elif not args.quiet:
                print(
                    f"[{len(turn.fed_ids)} new prompt tokens, {turn.cached} reused from "
                    f"the cache] "
                    + format_metrics(gen.metrics(), model.decode_fabric.ledger.device.name),
                    file=sys.stderr,
                    flush=True,
                )

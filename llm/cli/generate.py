"""``python -m llm generate``: a prompt (or a batch file, or a chat question) in, tokens out."""

from __future__ import annotations

import json
import sys

from meshrt import runtime

from ..serve.options import BatchOptions, GenerateOptions, ModelSource, PromptSpec, StopOptions
from ..serve.scheduler import DEFAULT_MAX_BATCH
from .common import (
    WEIGHTS_NOTE,
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
    token_ids,
)


def add_parser(sub) -> None:
    p = subparser(
        sub,
        "generate",
        "generate tokens with a model on the emulated wafer",
        "Prefill the prompt and decode new tokens on the virtual meshes. The model is "
        "a shard set (validated against this job before anything is read) or an HF "
        "model directory (each rank reads and places its own tiles). Tokens stream to "
        "stdout on rank 0 as they are made." + WEIGHTS_NOTE,
        "examples:\n"
        "  python -m llm generate --model tests/fixtures/tiny-llama-gqa --prompt-ids "
        "1,5,9 --decode-mesh 2x2\n"
        "  mpiexec -n 4 python -m mpi4py -m llm generate --model shards/model --prompt "
        '"Hello" --max-new-tokens 64 --temperature 0.7 --top-p 0.9\n',
    )
    p.add_argument("--model", metavar="PATH", help="shard set (from convert) or HF model directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (needs the model's tokenizer.json)")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt text from FILE")
    src.add_argument(
        "--prompt-ids",
        metavar="IDS",
        type=token_ids,
        help="prompt as token ids, e.g. 1,450,4996 (no tokenizer needed; without "
        "one the output is token ids too)",
    )
    from ..serve.batch import BATCH_HELP

    add_batch_args(p, src)
    add_chat_args(p, src)
    p.epilog += "\n" + BATCH_HELP
    p.add_argument("--max-new-tokens", type=positive, default=32, help="default 32")
    p.add_argument(
        "--temperature",
        type=temperature,
        default=0.0,
        help="0 = greedy on the mesh (default); > 0 samples on the host",
    )
    p.add_argument(
        "--top-k", type=non_negative, default=0, help="keep the k most likely tokens (0 = all)"
    )
    p.add_argument(
        "--top-p", type=probability, default=1.0, help="nucleus sampling mass, in (0, 1] (1 = off)"
    )
    p.add_argument("--seed", type=non_negative, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="do not stop at the model's end-of-sequence tokens (benchmarks, tests)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="ID|TEXT",
        help="stop at this token id or text (repeatable); the model's EOS always stops",
    )
    add_mesh_args(p, None, " (default: as converted; for an HF directory 2x2 cores per rank)")
    p.add_argument(
        "--max-context",
        type=positive,
        default=None,
        metavar="TOKENS",
        help="HF directory: shorter context than the model's max_position_embeddings",
    )
    p.add_argument(
        "--kv-capacity",
        type=positive,
        default=None,
        metavar="SLOTS",
        help="KV slots per core (default: enough for prompt + new tokens); when "
        "smaller, generation ends early with stopped_by kv_full",
    )
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
        help="print one JSON record (tokens, text, timings, modeled wafer time)",
    )
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="print the text once at the end instead of token by token",
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress or timing lines, only the generated text",
    )


def add_batch_args(p, prompt_group) -> None:
    """Register ``--batch`` (one of the prompt sources), ``--out`` and ``--strict``."""
    prompt_group.add_argument(
        "--batch", metavar="FILE", help="run every request of a JSON-lines file (see 'batch mode')"
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="with --batch: results file, appended one JSON line per request",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="with --batch: a bad request line stops the job (default: skip it)",
    )
    p.add_argument(
        "--allow-sampling-change",
        action="store_true",
        help="with --batch: resume into --out even if its results were made with other "
        "sampling settings (temperature, top_k, top_p, seed) than their requests say now",
    )
    p.add_argument(
        "--max-batch",
        type=positive,
        default=DEFAULT_MAX_BATCH,
        metavar="B",
        help="with --batch: up to B requests decode together, each with its own KV cache; "
        "a finished one makes room for the next (default %(default)s; 1: one after the other)",
    )
    p.add_argument(
        "--kv-pool",
        type=positive,
        default=None,
        metavar="SLOTS",
        help="with --batch: KV slots per core that the requests decoding together share "
        "(default: B caches); requests that do not fit wait for one that finishes",
    )


def add_chat_args(p, prompt_group) -> None:
    """``generate --chat QUESTION`` (a prompt source) and ``--system TEXT``."""
    prompt_group.add_argument(
        "--chat",
        metavar="QUESTION",
        help="ask QUESTION as a user turn of the model's chat template "
        "(tokenizer_config.json chat_template; from GGUF: kept at "
        "convert)",
    )
    p.add_argument(
        "--system",
        metavar="TEXT",
        default=None,
        help="with --chat: system message (default: the template's own, if any)",
    )


def options(args) -> tuple[ModelSource, GenerateOptions]:
    """Where the model comes from, and the request."""
    source = ModelSource(
        args.model,
        mesh_spec(args),
        run_options(args),
        verify=args.verify,
        max_context=args.max_context,
    )
    prompt = PromptSpec(
        text=args.prompt,
        file=args.prompt_file,
        ids=args.prompt_ids,
        chat=args.chat,
        system=args.system,
        batch=args.batch,
    )
    request = GenerateOptions(
        prompt,
        args.max_new_tokens,
        sampling_options(args),
        StopOptions(tuple(args.stop), args.ignore_eos),
        args.kv_capacity,
    )
    return source, request


def run(args, plane) -> int:
    """Check everything, load the model, then one request (streamed) or a whole batch."""
    from meshrt.mesh import MeshError

    from ..serve.generate import (
        format_metrics,
        generate,
        load_model,
        result_record,
        violation_warning,
    )
    from ..serve.preflight import check_kv_capacity, prepare
    from ..text.tokenizer import StreamDecoder

    rank = plane.rank
    log = runtime.setup_logging(plane, name="llm")
    source, request = options(args)
    try:  # every value is checked before any weight is read
        sampler = request.sampling.sampler()
    except ValueError as e:
        raise runtime.UsageError(str(e)) from None
    if request.prompt.system is not None and request.prompt.chat is None:
        raise runtime.UsageError("--system goes with --chat")
    checked = prepare(source, request, plane)
    tokenizer, ids, stop = checked.tokenizer, checked.ids, checked.stop
    if request.prompt.chat is not None:  # rendered (bounded) before any weight is read
        from ..serve.chat import chat_prompt_ids

        ids = chat_prompt_ids(
            source.path, tokenizer, request.prompt.chat, request.prompt.system, plane
        )
    batch = None
    if request.prompt.batch:  # the files are checked before the model loads
        from ..serve.batch import check_batch_files

        batch = BatchOptions(
            request.prompt.batch,
            args.out,
            args.strict,
            args.allow_sampling_change,
            args.max_batch,
            args.kv_pool,
        )
        check_batch_files(batch, plane)
    try:
        model = load_model(source, plane)
    except MeshError as e:
        raise runtime.UsageError(str(e)) from None
    if batch is not None:
        from ..serve.batch import run_batch
        from ..text.chat_template import ChatTemplate

        return run_batch(
            batch,
            request,
            model,
            tokenizer,
            plane,
            log,
            lambda ids, gen: result_record(model, tokenizer, ids, gen),
            lambda: ChatTemplate.from_model_dir(source.path),
        )
    if request.prompt.chat is not None:
        if len(ids) + request.max_new_tokens > model.config.max_position_embeddings:
            raise runtime.UsageError(
                f"prompt ({len(ids)} tokens) + --max-new-tokens {request.max_new_tokens} exceeds "
                f"the model context of {model.config.max_position_embeddings} tokens"
            )
    capacity = check_kv_capacity(model, len(ids), request.max_new_tokens, request.kv_capacity, log)
    dl, pl = model.layouts["decode"], model.layouts["prefill"]
    log.info(
        f"model {model.config.name or model.config.family}: {model.config.num_layers} layers; "
        f"prefill on {pl.py}x{pl.px}, decode on {dl}; {len(ids)} prompt tokens"
    )
    stream = rank == 0 and not args.no_stream and not args.json
    streamer = StreamDecoder(tokenizer) if tokenizer is not None else None

    def on_token(t):
        if stream:  # without a tokenizer the ids themselves are the output
            sys.stdout.write(streamer.push(t) if streamer else f"{t} ")
            sys.stdout.flush()

    try:
        gen = generate(model, ids, request.max_new_tokens, sampler, stop, on_token, capacity)
    except FloatingPointError as e:  # non-finite logits: the model or its weights are broken
        raise runtime.UsageError(str(e)) from None
    if stream:
        sys.stdout.write((streamer.flush() if streamer else "") + "\n")
    out = result_record(model, tokenizer, ids, gen)
    warning = violation_warning(out["violations"], out["device"])
    if warning and rank == 0:  # the same on every rank: say it once
        log.warning(warning)
    if rank == 0:
        if args.json:
            print(json.dumps(out))
        elif args.no_stream:  # the text it held back, or the ids without a tokenizer
            ids_text = " ".join(str(t) for t in gen.new_ids)
            print(out["text"] if out["text"] is not None else ids_text, flush=True)
        if not args.json and not args.quiet:
            print(format_metrics(out, model.decode_fabric.ledger.device.name), file=sys.stderr)
    return 0

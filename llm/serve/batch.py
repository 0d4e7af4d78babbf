"""Batch generation: ``llm generate --batch requests.jsonl --out results.jsonl``.

The model is loaded once; up to ``--max-batch`` requests decode together on the mesh, each with
its own KV cache (continuous batching, :mod:`llm.serve.scheduler`: a finished request frees
its cache and the next one's prefill runs between decode steps; ``--max-batch 1`` runs them one
after the other). Each request's tokens are those it gets alone.

Input: one JSON object per line (blank lines are ignored)::

    {"id": "q1", "prompt": "Once upon a time", "max_new_tokens": 40}
    {"id": 2, "messages": [{"role": "user", "content": "What is 2+2?"}], "temperature": 0.7}
    {"id": "raw", "prompt_ids": [1, 450, 4996]}

``id`` (a string or an integer, unique) and exactly one of ``prompt``, ``messages`` (rendered
with the model's chat template) or ``prompt_ids`` are required. Optional per request:
``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop`` (a list of token
ids or single-token strings), ``ignore_eos``; they default to the command line's values.

Output: one JSON object per finished request, appended and flushed (and fsync'ed) as soon as it
completes: the request's ``id`` and input ``line``, then the same record ``generate --json``
prints (``prompt_ids``, ``new_ids``, ``text``, ``stopped_by``, timings, modeled wafer time,
meshes). Results come in the requests' order, one line each (a request that finishes before
an earlier one waits for it and is written right after it).

Each result also records its request's sampling settings (``sampling``: ``temperature``,
``top_k``, ``top_p``, ``seed``).

Resuming: a rerun with the same ``--out`` skips every id already there, so a killed job loses at
most the requests in flight (and those finished behind them). A last line without its newline
that begins as a result does (the job died while writing it) is cut off before anything is
appended and its request runs again.
Any other content (a line that is not a result, a file that is not a results file) stops the
job with an error naming the file, which is left untouched; so does ``--out`` naming the
``--batch`` file itself (also through a link), a directory or a device. A finished result whose
sampling settings differ from its request's now is refused too, unless
``--allow-sampling-change``. A job stopped by SIGTERM says so, with how to resume, and exits
with status 143; also when the signal (or Ctrl-C) went to ``mpiexec`` itself, which then
stops forwarding the ranks' output (rank 0 writes to mpiexec's stderr directly; the job's
status is then mpiexec's own, 1).

A bad input line (not UTF-8, not JSON, unknown keys, no prompt, a prompt that does not fit the
context, a duplicate id, ...) is reported with its line number and skipped; with ``--strict`` the
job stops before generating anything. Requests are checked on rank 0 and the checked list is
broadcast, so every rank runs the same requests.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshrt import runtime

from .options import BatchOptions, GenerateOptions, StopOptions
from .results import (
    BadRequest,
    ResultWriter,
    check_out,
    check_sampling,
    finished_ids,
    id_key,
)

if TYPE_CHECKING:
    from ..text.chat_template import ChatTemplate

PROMPT_KEYS = ("prompt", "messages", "prompt_ids")
SETTING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos")
KNOWN_KEYS = frozenset(("id",) + PROMPT_KEYS + SETTING_KEYS)
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed")
#: Longest request line read (bytes): a longer one (or an endless one, /dev/zero) is refused.
MAX_LINE_BYTES = 16 << 20
#: Exit status of a batch stopped by SIGTERM (128 + 15, as the shell reports it).
STOPPED_EXIT = 143

BATCH_HELP = """\
batch mode (--batch FILE --out FILE):
  FILE holds one JSON request per line: "id" plus one of "prompt", "messages" (chat, rendered
  with the model's template) or "prompt_ids", and optionally max_new_tokens, temperature, top_k,
  top_p, seed, stop, ignore_eos (defaults: this command's options). The model is loaded once;
  up to --max-batch requests decode together (each its own KV cache; --kv-pool SLOTS caps the
  slots per core they share: requests that do not fit wait).
  Each result is appended to --out as one JSON line (id, line, prompt_ids, new_ids, text,
  stopped_by, sampling, and the metrics of --json) and flushed when its request finishes. A
  rerun skips the ids already in --out; a half-written last result line (a job killed while
  writing it) is cut off and its request runs again; a result made with other sampling
  settings than its request's now stops the job unless --allow-sampling-change. --out must
  be a results file (or new). A bad request line is reported with its number and skipped, or
  stops the job before any generation with --strict. SIGTERM stops the job (exit 143); the
  same command resumes it.
"""


@dataclass
class Request:
    """A checked request: everything a rank needs to run it."""

    id: object
    line: int
    prompt_ids: list
    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0
    stop_ids: list = field(default_factory=list)

    def sampling(self) -> dict:
        """The sampling settings stored with the result (compared when a job resumes)."""
        return {k: getattr(self, k) for k in SAMPLING_KEYS}


# ----------------------------------------------------------------------------------------------
# reading requests (rank 0)
# ----------------------------------------------------------------------------------------------


def _int(obj, key, default, low=None):
    value = obj.get(key, default)
    if value is None and key == "seed":
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise BadRequest(f"{key} must be >= {low}, got {value}")
    return value


def _float(obj, key, default):
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number, got {value!r}")
    return float(value)


class RequestReader:
    """Turns request lines into :class:`Request` s (tokenizing, templating, checking).

    Parameters
    ----------
    tokenizer
        ``encode(text, add_special_tokens=...)``.
    config : ModelConfig
        Vocabulary, context length and EOS ids.
    defaults : GenerateOptions
        The command's ``max_new_tokens``, sampling and stop options.
    template_loader : callable, optional
        ``() -> ChatTemplate``; called on the first ``messages`` request.
    """

    def __init__(self, tokenizer, config, defaults: GenerateOptions, template_loader=None):
        self.tokenizer, self.config, self.defaults = tokenizer, config, defaults
        self._template_loader = template_loader
        self._template: ChatTemplate | None = None
        self.seen: set = set()

    def _chat_prompt(self, messages) -> str:
        from ..text.chat_template import ChatTemplateError

        if self._template is None:
            if self._template_loader is None:
                raise BadRequest(
                    "'messages' needs the model's chat template, and this model has none"
                )
            try:
                self._template = self._template_loader()
            except ChatTemplateError as e:
                raise BadRequest(str(e)) from None
        try:
            return self._template.render(messages)
        except ChatTemplateError as e:
            raise BadRequest(str(e)) from None

    def _prompt_ids(self, obj) -> list:
        given = [k for k in PROMPT_KEYS if k in obj]
        if len(given) != 1:
            raise BadRequest(
                f"give exactly one of {', '.join(PROMPT_KEYS)} "
                f"({'none' if not given else ' and '.join(given)} given)"
            )
        key = given[0]
        if key == "prompt_ids":
            ids = obj[key]
            if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids
            ):
                raise BadRequest("prompt_ids must be a list of integers")
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise BadRequest(
                    f"prompt_ids {bad[:3]} are outside the vocabulary "
                    f"(0..{self.config.vocab_size - 1})"
                )
            return list(ids)
        if key == "prompt":
            if not isinstance(obj[key], str):
                raise BadRequest("prompt must be a string")
            return list(self.tokenizer.encode(obj[key]))
        text = self._chat_prompt(obj[key])
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _stop_ids(self, obj) -> list:
        from .preflight import stop_ids

        stop = obj.get("stop", list(self.defaults.stop.stop))
        if isinstance(stop, (str, int)) and not isinstance(stop, bool):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, (str, int)) for s in stop):
            raise BadRequest("stop must be a list of token ids or strings")
        ignore_eos = obj.get("ignore_eos", self.defaults.stop.ignore_eos)
        if not isinstance(ignore_eos, bool):
            raise BadRequest(f"ignore_eos must be true or false, got {ignore_eos!r}")
        try:
            ids = stop_ids(
                StopOptions(tuple(str(s) for s in stop), ignore_eos), self.tokenizer, self.config
            )
        except runtime.UsageError as e:
            raise BadRequest(str(e).removeprefix("error: ")) from None
        return sorted(ids)

    def parse(self, text: str, line: int) -> Request:
        """One line -> :class:`Request`; raises :class:`BadRequest`."""
        from ..text.sampling import Sampler

        try:
            obj = json.loads(text)
        except ValueError as e:
            raise BadRequest(f"not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise BadRequest("a request must be a JSON object")
        unknown = sorted(set(obj) - KNOWN_KEYS)
        if unknown:
            raise BadRequest(
                f"unknown keys {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})"
            )
        rid = obj.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise BadRequest("'id' (a string or an integer) is required")
        if id_key(rid) in self.seen:
            raise BadRequest(f"duplicate id {rid!r}")
        d, sampling = self.defaults, self.defaults.sampling
        req = Request(
            id=rid,
            line=line,
            prompt_ids=self._prompt_ids(obj),
            max_new_tokens=_int(obj, "max_new_tokens", d.max_new_tokens, low=1),
            temperature=_float(obj, "temperature", sampling.temperature),
            top_k=_int(obj, "top_k", sampling.top_k, low=0),
            top_p=_float(obj, "top_p", sampling.top_p),
            seed=_int(obj, "seed", sampling.seed, low=0),
            stop_ids=self._stop_ids(obj),
        )
        try:
            Sampler(req.temperature, req.top_k, req.top_p, req.seed)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if not req.prompt_ids:
            raise BadRequest("the prompt is empty")
        need = len(req.prompt_ids) + req.max_new_tokens
        if need > self.config.max_position_embeddings:
            raise BadRequest(
                f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens "
                f"{req.max_new_tokens} exceeds the model context of "
                f"{self.config.max_position_embeddings} tokens"
            )
        self.seen.add(id_key(rid))
        return req


def read_requests(path, reader: RequestReader) -> tuple[list, list]:
    """``(requests, problems)`` of a JSON-lines file; ``problems`` = ``[(line, message)]``.

    A line that is not UTF-8 text is one of the problems, reported by number; a line longer
    than :data:`MAX_LINE_BYTES` (or a file that is not one: a directory, a device) stops.
    """
    requests, problems = [], []
    try:
        kind = os.stat(path).st_mode
        if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):
            what = "a directory" if stat.S_ISDIR(kind) else "not a regular file"
            raise BadRequest(f"--batch {path} is {what}; give a JSON-lines file of requests")
        with open(path, "rb") as f:
            number = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise BadRequest(
                        f"{path}:{number}: a line longer than {MAX_LINE_BYTES >> 20} MiB; "
                        "is this a file of JSON requests?"
                    )
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems.append((number, f"not UTF-8 text ({e.reason} at byte {e.start})"))
                    continue
                if not text.strip():
                    continue
                try:
                    requests.append(reader.parse(text, number))
                except BadRequest as e:
                    problems.append((number, str(e)))
    except OSError as e:
        raise BadRequest(f"cannot read --batch {path}: {e.strerror or e}") from None
    return requests, problems


# ----------------------------------------------------------------------------------------------
# the results file (rank 0)
# ----------------------------------------------------------------------------------------------


def check_batch_files(batch: BatchOptions, plane) -> None:
    """Before the model loads: ``--batch`` and ``--out`` are files this job can use (checked
    on rank 0, the same ``UsageError`` on every rank)."""

    def check() -> None:
        try:
            kind = os.stat(batch.requests).st_mode
            if not (stat.S_ISREG(kind) or stat.S_ISFIFO(kind)):
                what = "a directory" if stat.S_ISDIR(kind) else "not a regular file"
                raise BadRequest(
                    f"--batch {batch.requests} is {what}; give a JSON-lines file of requests"
                )
        except OSError as e:
            raise BadRequest(f"cannot read --batch {batch.requests}: {e.strerror or e}") from None
        check_out(batch.out, batch.requests)
        finished_ids(batch.out, cut=False)

    try:
        plane.agree(check, catch=BadRequest)
    except BadRequest as e:
        raise runtime.UsageError(str(e)) from None


class Stopped(Exception):
    """SIGTERM arrived while the batch ran."""


class StopOnSigterm:
    """While installed, SIGTERM raises :class:`Stopped` in the main thread of rank 0, except
    while a result is being recorded (``with guard.recording():``): then right after it.

    Under ``mpiexec`` or ``scancel`` every rank gets the signal. Only rank 0 (``lead``) acts on
    it: the others keep going, so that a rank 0 waiting for them in a message returns to Python,
    says how to resume, and ends the job (were another rank to end first, rank 0 would be torn
    down while blocked in that message, before a word was printed).

    It also notes when SIGCONT arrives: a launcher ending the job (Open MPI's mpiexec on its
    own SIGTERM or SIGINT, Slurm's ``scancel``) sends it just before SIGTERM
    (:meth:`continued_lately`).
    """

    def __init__(self, lead: bool = True):
        self.lead = lead
        self.previous: Any = None
        self.previous_continue: Any = None
        self.continued: float | None = None  # time.monotonic() of the last SIGCONT
        self.pending = False
        self.busy = False

    def _on_continue(self, signum, frame):
        self.continued = time.monotonic()

    def continued_lately(self, within: float = 2.0) -> bool:
        """Whether SIGCONT arrived in the last ``within`` seconds."""
        return self.continued is not None and time.monotonic() - self.continued < within

    def _handler(self, signum, frame):
        if not self.lead:
            return
        if self.busy:
            self.pending = True
        else:
            raise Stopped()

    def install(self) -> StopOnSigterm:
        """Take over SIGTERM and SIGCONT (kept as they were outside the main thread)."""
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handler)
            self.previous_continue = signal.signal(signal.SIGCONT, self._on_continue)
        except ValueError:
            self.previous = self.previous_continue = None
        return self

    def restore(self) -> None:
        """Give SIGTERM and SIGCONT back their previous handlers."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        if self.previous_continue is not None:
            signal.signal(signal.SIGCONT, self.previous_continue)

    @contextmanager
    def recording(self):
        """A section SIGTERM does not interrupt (it takes effect at its end)."""
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
        if self.pending:
            raise Stopped()


#: Names of Open MPI's launcher process (``mpiexec`` and ``mpirun`` run ``prterun``).
OPEN_MPI_LAUNCHERS = frozenset(("prterun", "prte", "mpiexec", "mpirun"))


def _launcher_stopped_forwarding(wait: float = 0.1) -> bool:
    """Whether this rank's launcher is Open MPI's and does not read what the rank writes on
    stderr: ``wait`` seconds after the last write, the pipe still holds it.

    On SIGTERM or SIGINT (``kill``, ``timeout``, ``scancel``, Ctrl-C on its terminal) Open
    MPI's mpiexec ends the job by itself: it sends SIGCONT, SIGTERM and, a quarter of a second
    later, SIGKILL to the ranks, and reads none of their output in between."""
    try:
        if not stat.S_ISFIFO(os.fstat(2).st_mode):
            return False
        with open(f"/proc/{os.getppid()}/comm") as f:
            if f.read().strip() not in OPEN_MPI_LAUNCHERS:
                return False
        import array
        import fcntl
        import termios

        unread = array.array("i", [0])
        deadline = time.monotonic() + wait
        while True:
            fcntl.ioctl(2, termios.FIONREAD, unread)
            if unread[0] == 0:
                return False
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.005)
    except OSError:
        return False


def tell_past_the_launcher(message: str, ending) -> bool:
    """Print ``message`` on stderr, and if the launcher is ending the job and no longer
    forwards it (:func:`_launcher_stopped_forwarding`, and ``ending()``: SIGCONT came, see
    :class:`StopOnSigterm`), write it to the launcher's own stderr (terminal, pipe or file,
    appended). Returns whether it did: then this process must end without more words (Open
    MPI would write its MPI_Abort report where the launcher's file position is, over the
    message)."""
    print(message, file=sys.stderr, flush=True)
    if not (_launcher_stopped_forwarding() and ending()):  # SIGCONT is handled while waiting
        return False
    # written as a background job may (mpiexec has the terminal): SIGTTOU ignored
    ignored = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_NONBLOCK
        fd = os.open(f"/proc/{os.getppid()}/fd/2", flags)
        try:
            os.write(fd, (message + "\n").encode())
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        signal.signal(signal.SIGTTOU, ignored)
    return True


def _prepare(
    batch: BatchOptions, defaults: GenerateOptions, model, tokenizer, template_loader, log
) -> tuple:
    """Rank 0: check the files and read the requests -> ``("ok", pending, problems, n_done)``."""
    check_out(batch.out, batch.requests)
    reader = RequestReader(tokenizer, model.config, defaults, template_loader)
    requests, problems = read_requests(batch.requests, reader)
    for number, message in problems:
        log.warning(
            f"{batch.requests}:{number}: {message}; "
            + ("stopping (--strict)" if batch.strict else "skipped")
        )
    if problems and batch.strict:
        number, message = problems[0]
        raise BadRequest(
            f"{batch.requests}:{number}: {message} (--strict: nothing was run; "
            f"{len(problems)} bad line{'s' if len(problems) > 1 else ''})"
        )
    done, cut = finished_ids(batch.out, cut=False)  # nothing is cut before all is checked
    check_sampling(done, requests, batch.out, batch.allow_sampling_change, log)
    if cut:
        finished_ids(batch.out)
        log.warning(
            f"{batch.out}: cut off a half-written last line ({cut} bytes); its request runs again"
        )
    pending = [r for r in requests if id_key(r.id) not in done]
    _check_prompts_fit(pending, defaults.kv_capacity, model, batch.requests)
    log.info(
        f"batch {batch.requests}: {len(requests)} requests, {len(requests) - len(pending)} "
        f"already in {batch.out}, {len(pending)} to run"
        + (f", {len(problems)} bad lines skipped" if problems else "")
    )
    return pending, problems


def _check_prompts_fit(pending, capacity: int | None, model, path) -> None:
    """With ``--kv-capacity``, every prompt must fit the cache before anything runs (as for one
    ``generate``); the first that does not is a :class:`BadRequest` naming it."""
    if capacity is None:
        return
    rows = model.layouts["decode"].py
    for req in pending:
        slots = math.ceil(len(req.prompt_ids) / rows)  # the prompt is spread over the rows
        if slots > capacity:
            raise BadRequest(
                f"{path}:{req.line}: id {req.id!r}: --kv-capacity {capacity} is too small for "
                f"its prompt: {len(req.prompt_ids)} tokens need {slots} slots per core on "
                f"{rows} rows (nothing was run)"
            )


def run_batch(
    batch: BatchOptions,
    defaults: GenerateOptions,
    model,
    tokenizer,
    plane,
    log,
    record,
    template_loader=None,
) -> int:
    """Run every pending request of ``batch.requests`` (collective over ``plane``).

    Parameters
    ----------
    batch : BatchOptions
        The requests file, the results file and whether a bad line stops the job.
    defaults : GenerateOptions
        What a request does not say (token limit, sampling, stop, KV capacity).
    model : MeshModel
    tokenizer
    plane : meshrt.runtime.ControlPlane
    log : logging.Logger
    record : callable
        ``(prompt_ids, Generation) -> dict``, the ``generate --json`` record (called everywhere,
        used on rank 0).
    template_loader : callable, optional
        ``() -> ChatTemplate`` for ``messages`` requests.

    Returns
    -------
    int
        Exit status: 0, also when bad lines were skipped (they are in the log).
    """
    from tqdm import tqdm

    from ..text.sampling import Sampler
    from .generate import generate

    rank = plane.rank
    answer = None
    if rank == 0:
        try:
            answer = ("ok",) + _prepare(batch, defaults, model, tokenizer, template_loader, log)
        except BadRequest as e:
            answer = ("error", str(e))
    answer = plane.bcast(answer)  # control plane: the checked requests
    if answer[0] == "error":
        raise runtime.UsageError(answer[1])
    pending = answer[1]
    writer = ResultWriter(batch.out) if rank == 0 else None
    bar = tqdm(
        total=len(pending),
        unit="req",
        desc="batch",
        disable=True if rank else None,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
    )
    tokens, finished, t0 = 0, 0, time.perf_counter()
    ended_by_launcher = False
    guard = StopOnSigterm(lead=rank == 0).install()

    def done(req, gen) -> None:
        nonlocal tokens, finished
        tokens += len(gen.new_ids)
        rate = tokens / (time.perf_counter() - t0)
        if writer is not None:
            result = record(req.prompt_ids, gen)
            # the progress and log lines too: SIGTERM raised inside a logging handler would be
            # swallowed by logging (several results are written at once in a batch)
            with guard.recording():
                writer.write({"id": req.id, "line": req.line, "sampling": req.sampling(), **result})
                finished += 1
                bar.update(1)
                bar.set_postfix_str(f"{rate:.1f} tok/s", refresh=False)
                if bar.disable:
                    log.info(
                        f"batch: id {req.id!r} done ({len(gen.new_ids)} tokens, "
                        f"{gen.stopped_by}); {finished}/{len(pending)}, {rate:.1f} tok/s"
                    )

    try:
        if batch.max_batch > 1 or batch.kv_pool is not None:
            _run_together(batch, defaults, model, pending, done)
        else:
            for req in pending:
                sampler = Sampler(req.temperature, req.top_k, req.top_p, req.seed)
                gen = generate(
                    model,
                    req.prompt_ids,
                    req.max_new_tokens,
                    sampler,
                    req.stop_ids,
                    None,
                    defaults.kv_capacity,
                )
                done(req, gen)
    except Stopped:  # rank 0 only: it says so, and its exit ends the job
        bar.close()
        ended_by_launcher = tell_past_the_launcher(
            f"batch stopped by SIGTERM after {finished} of {len(pending)} requests (results "
            f"so far in {batch.out}); to resume, run the same command again: finished "
            "requests are skipped",
            guard.continued_lately,
        )
        if not ended_by_launcher:
            raise SystemExit(STOPPED_EXIT) from None
    finally:
        guard.restore()
        bar.close()
        if writer is not None:
            writer.close()
    if ended_by_launcher:  # no MPI_Abort: its report would be written over the message
        sys.stdout.flush()
        os._exit(STOPPED_EXIT)
    log.info(
        f"batch: {len(pending)} requests, {tokens} tokens in "
        f"{time.perf_counter() - t0:.1f} s -> {batch.out}"
    )
    return 0


def _run_together(batch: BatchOptions, defaults: GenerateOptions, model, pending, done) -> None:
    """The requests with up to ``batch.max_batch`` decoding together
    (:func:`llm.serve.scheduler.run_continuous`); ``done(request, generation)`` in the
    requests' order (a request that finishes early waits for those before it)."""
    from ..text.sampling import Sampler
    from .scheduler import Job, run_continuous, slots_needed

    if not pending:
        return
    jobs = [
        Job(
            req,
            req.prompt_ids,
            req.max_new_tokens,
            Sampler(req.temperature, req.top_k, req.top_p, req.seed),
            frozenset(req.stop_ids),
        )
        for req in pending
    ]
    capacity = slots_needed(model, jobs, defaults.kv_capacity)
    if batch.kv_pool is not None and capacity > batch.kv_pool:
        biggest = max(jobs, key=lambda j: len(j.prompt_ids) + j.max_new_tokens)
        raise runtime.UsageError(
            f"--kv-pool {batch.kv_pool} is too small: each request's KV cache needs {capacity} "
            f"slots per core (id {biggest.key.id!r}: {len(biggest.prompt_ids)} prompt + "
            f"{biggest.max_new_tokens} new tokens)"
        )
    order = {id(j): n for n, j in enumerate(jobs)}
    held: dict[int, tuple] = {}
    next_out = 0

    def finished(job: Job, gen) -> None:
        nonlocal next_out
        held[order[id(job)]] = (job.key, gen)
        while next_out in held:
            done(*held.pop(next_out))
            next_out += 1

    run_continuous(model, jobs, batch.max_batch, capacity, batch.kv_pool, finished)

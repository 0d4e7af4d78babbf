"""What ``generate`` and ``chat`` check before any model loads: the model path, config,
tokenizer, chat template and prompt.

Every check that reads the filesystem runs on every rank and the ranks agree on the outcome
(:func:`agree`): a model directory missing on one node (no shared filesystem) ends every rank
with the same one-line message instead of a hang or a traceback on that rank alone. What each
rank read must also be the same (:func:`same_on_every_rank`): ranks that tokenize with
different files would feed different tokens and diverge.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace

from meshrt import runtime
from meshrt.runtime import ControlPlane

from ..modeling.config import ConfigError, ModelConfig
from ..modeling.weights import CheckpointError
from ..storage.shards import MANIFEST_NAME, ShardError, file_sha256, read_manifest
from .options import GenerateOptions, ModelSource, PromptSpec, RunOptions, StopOptions

#: Failures of bad input or of the environment (a user can fix them): one message, exit 2.
EXPECTED = (
    runtime.UsageError,
    ConfigError,
    CheckpointError,
    ShardError,
    NotImplementedError,
    OSError,
    UnicodeDecodeError,
)


def agree(control: ControlPlane, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on every rank; if it fails on any rank with an :data:`EXPECTED`
    error, every rank raises ``UsageError`` with the first rank's message (rank-named when
    not every rank failed alike)."""

    def check():
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            raise runtime.UsageError(_message(e)) from None

    return control.agree(check, on="all", catch=runtime.UsageError)


def same_on_every_rank(control: ControlPlane, value: str, what: str) -> None:
    """Return if every rank holds the same ``value`` (a short text saying what that rank
    read), else raise the same ``UsageError`` on every rank. Collective over ``control``."""
    values = control.allgather(value)
    for rank, other in enumerate(values):
        if other != values[0]:
            raise runtime.UsageError(
                f"the ranks read different {what}s: rank 0 {values[0]}, rank {rank} {other} "
                "(give every rank the same model directory)"
            )


def same_as_root(control: ControlPlane, value, differs) -> None:
    """Return if this rank's ``value`` equals rank 0's on every rank, else raise the same
    ``UsageError`` on every rank: ``"on rank R: " + differs(value, rank_0_value)`` for the
    lowest rank R that differs. Collective over ``control``."""
    root = control.bcast(value)

    def check():
        if value != root:
            raise runtime.UsageError(differs(value, root))

    agree(control, check)


def weight_files(path, verify: bool = True) -> dict:
    """``{file name: "sha256 ..." or "N bytes"}`` of the weight files of an HF model directory
    (its safetensors index, if any, and every ``*.safetensors``); sizes only without
    ``verify``."""
    from ..storage.checkpoint import INDEX_FILE

    out = {}
    for p in sorted(os.scandir(path), key=lambda e: e.name):
        if p.name == INDEX_FILE or p.name.endswith(".safetensors"):
            out[p.name] = (
                f"sha256 {file_sha256(p.path)[:12]}" if verify else f"{p.stat().st_size} bytes"
            )
    return out


def _weights_differ(path):
    def differs(mine: dict, root: dict) -> str:
        for name in sorted(set(mine) | set(root)):
            if name not in mine:
                return f"{path} has no {name}, which rank 0 has (give every rank the same model)"
            if name not in root:
                return f"{path} has {name}, which rank 0 has not (give every rank the same model)"
            if mine[name] != root[name]:
                return (
                    f"{path}/{name} differs from rank 0's ({mine[name]}, rank 0 {root[name]}): "
                    "give every rank the same model"
                )
        return f"{path}: the weight files differ from rank 0's"

    return differs


def digest(value) -> str:
    """A short sha256 of a JSON-able ``value`` (keys sorted), to compare what ranks read."""
    text = json.dumps(value, sort_keys=True, default=list)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _message(e: BaseException) -> str:
    if isinstance(e, SystemExit):
        return str(e.code)
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


def model_kind(path) -> str:
    """``"shards"`` or ``"hf"`` for the directory ``path`` (``UsageError`` if neither)."""
    if path is None:
        raise runtime.UsageError(
            "give the model: --model DIR (a shard set made by `python -m "
            "llm convert`, or an HF model directory)"
        )
    if not os.path.isdir(path):
        raise runtime.UsageError(
            f"--model {path}: no such directory (give a shard set made by "
            "`python -m llm convert`, or an HF model directory)"
        )
    if os.path.exists(os.path.join(path, MANIFEST_NAME)):
        return "shards"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise runtime.UsageError(
        f"--model {path} is not a shard set (no {MANIFEST_NAME}) or an HF "
        "model directory (no config.json)"
    )


def read_config(path, kind: str, max_context: int | None = None) -> ModelConfig:
    """The model's config from the manifest or ``config.json`` (nothing else is read)."""
    if kind == "shards":
        return ModelConfig.from_dict(read_manifest(path)["config"])
    return ModelConfig.from_json(path, max_context=max_context)


def open_tokenizer(
    path,
    config: ModelConfig,
    need_text: bool,
    hint: str = "or give the prompt as token ids (--prompt-ids)",
):
    """The model's tokenizer, or ``None`` when it has none and only token ids are used.

    ``need_text``: the prompt or a stop string is text, so a tokenizer is required (``hint``
    ends the error message when there is none).
    """
    from ..text.tokenizer import TokenizerError, load_tokenizer

    try:
        return load_tokenizer(path, config)
    except TokenizerError as e:  # a damaged file is an error even when ids are given
        raise runtime.UsageError(str(e)) from None
    except ValueError as e:  # no tokenizer file and a vocabulary too small for bytes
        if need_text:
            raise runtime.UsageError(f"{e}; {hint}") from None
        return None


def tokenizer_identity(tokenizer) -> str:
    """What a rank's tokenizer was read from, for :func:`same_on_every_rank`."""
    if tokenizer is None:
        return "has none"
    path = getattr(tokenizer, "path", None)
    if path is None:
        return f"has the byte-level fallback (vocabulary {tokenizer.vocab_size})"
    return f"has {path.name} (sha256 {file_sha256(path)[:12]})"


def chat_template(
    path, hint: str = "llm chat needs a chat model (for a base model: llm generate --prompt TEXT)"
):
    """The :class:`~llm.text.chat_template.ChatTemplate` of a model directory or shard set
    (``UsageError`` if it has none, with ``hint`` on what to do instead, or if it is unusable or
    jinja2 is missing)."""
    from ..text.chat_template import ChatTemplate, ChatTemplateError, NoChatTemplate

    try:
        return ChatTemplate.from_model_dir(path)
    except NoChatTemplate as e:
        raise runtime.UsageError(f"{e}; {hint}") from None
    except ChatTemplateError as e:
        raise runtime.UsageError(str(e)) from None


def check_template(template) -> None:
    """A first turn renders within the template's bounds (``UsageError`` if not)."""
    from ..text.chat_template import ChatTemplateError

    try:
        template.check()
    except ChatTemplateError as e:
        raise runtime.UsageError(str(e)) from None


def decode_mesh(source: ModelSource, kind: str, nranks: int) -> tuple | None:
    """The decode mesh a run of ``source`` will use: ``--decode-mesh``, a shard set's own, or
    2x2 cores per rank for an HF directory (``None`` if a damaged manifest does not say; the
    shard reader then reports it)."""
    if source.mesh.decode is not None:
        return tuple(source.mesh.decode)
    if kind == "shards":
        try:
            return tuple(int(v) for v in read_manifest(source.path)["phases"]["decode"]["mesh"])
        except (KeyError, TypeError, ValueError):
            return None
    from meshrt.mesh import default_rank_grid

    ry, rx = source.mesh.ranks or default_rank_grid(nranks)
    return (2 * ry, 2 * rx)


def check_run(run: RunOptions, mesh: tuple | None) -> None:
    """``--device`` and ``--groups`` against the decode mesh (``UsageError`` if they cannot
    run): the K-tree splits each line of the mesh into at most as many groups as it has cores,
    along both axes (decode alternates them)."""
    from meshrt.plmr import get_device

    try:
        get_device(run.device)
    except ValueError as e:
        raise runtime.UsageError(f"--device {run.device}: {e}") from None
    if run.groups is None or run.allreduce != "ktree" or mesh is None:
        return
    line = min(mesh)
    if run.groups > line:
        raise runtime.UsageError(
            f"--groups {run.groups}: the K-tree splits each line of the decode mesh "
            f"{mesh[0]}x{mesh[1]} into groups, and its shortest lines have {line} cores: give "
            f"--groups between 1 and {line}"
        )


def _model_files(
    source: ModelSource, control: ControlPlane, need_text: bool, **hint
) -> tuple[str, str, ModelConfig, object]:
    """``(path, kind, config, tokenizer)`` of ``source.path``, agreed and the same on every
    rank."""
    path = source.path
    kind = agree(control, model_kind, path)
    assert path is not None, "model_kind refuses a missing --model on every rank"
    config = agree(control, read_config, path, kind, source.max_context)
    same_on_every_rank(control, f"has one of sha256 {digest(config.to_dict())}", "model config")
    check_run(source.run, agree(control, decode_mesh, source, kind, control.size))
    tokenizer = agree(control, open_tokenizer, path, config, need_text, **hint)
    same_on_every_rank(control, agree(control, tokenizer_identity, tokenizer), "tokenizer")
    if kind == "hf":  # every rank reads the tensors itself: the same bytes, before any is read
        same_as_root(
            control, agree(control, weight_files, path, source.verify), _weights_differ(path)
        )
    return path, kind, config, tokenizer


def parse_ids(text: str, vocab_size: int | None = None, what: str = "--prompt-ids") -> list:
    """``"1,2 3"`` -> ``[1, 2, 3]``, each a token id of the vocabulary (``UsageError`` if not)."""
    parts = str(text).replace(",", " ").split()
    if not parts:
        raise runtime.UsageError(f"{what} is empty; give token ids such as 1,450,4996")
    bad = [p for p in parts if not p.isdigit()]
    if bad:
        raise runtime.UsageError(
            f"{what}: {bad[0]!r} is not a token id (non-negative "
            "integers, separated by commas or spaces)"
        )
    ids = [int(p) for p in parts]
    if vocab_size is not None:
        out = [i for i in ids if i >= vocab_size]
        if out:
            raise runtime.UsageError(
                f"{what}: token id {out[0]} is outside the vocabulary (0..{vocab_size - 1})"
            )
    return ids


def read_prompt_file(name: str) -> str:
    """The text of ``--prompt-file`` (``UsageError`` if unreadable or not UTF-8)."""
    try:
        with open(name, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise runtime.UsageError(f"--prompt-file {name}: {_message(e)}") from None


def prompt_ids(prompt: PromptSpec, tokenizer, config: ModelConfig) -> list:
    """The prompt's token ids from ``--prompt-ids``, ``--prompt`` or ``--prompt-file``."""
    if prompt.ids:
        return parse_ids(prompt.ids, config.vocab_size)
    text = prompt.text
    if prompt.file:
        text = read_prompt_file(prompt.file)
    if text is None:
        raise runtime.UsageError(
            "give a prompt: --prompt TEXT, --prompt-file FILE or --prompt-ids '1 2 3'"
        )
    if tokenizer is None:
        raise runtime.UsageError(
            "this model has no tokenizer: give the prompt as token ids (--prompt-ids)"
        )
    ids = tokenizer.encode(text)
    if not ids:
        raise runtime.UsageError("the prompt is empty")
    return ids


def stop_ids(stop: StopOptions, tokenizer, config: ModelConfig) -> set:
    """EOS ids (unless ``--ignore-eos``) plus every ``--stop`` token id or one-token text."""
    out = set() if stop.ignore_eos else set(config.eos_ids)
    for item in stop.stop:
        for part in str(item).split(","):
            part = part.strip()
            if part.isdigit():
                out.update(parse_ids(part, config.vocab_size, "--stop"))
            elif part:
                if tokenizer is None:
                    raise runtime.UsageError(
                        f"--stop {part!r}: this model has no tokenizer; give token ids"
                    )
                ids = tokenizer.encode(part, add_special_tokens=False)
                if len(ids) != 1:
                    raise runtime.UsageError(
                        f"stop string {part!r} is {len(ids)} tokens; "
                        "give a single-token string or a token id"
                    )
                out.add(ids[0])
    return out


@dataclass
class Request:
    """A validated generation request: everything known before the model loads."""

    path: str
    kind: str
    config: ModelConfig
    tokenizer: object
    ids: list
    stop: set = field(default_factory=set)


def prepare(source: ModelSource, request: GenerateOptions, control: ControlPlane) -> Request:
    """Validate the model path and the prompt on every rank (agreed), before any weight is read.

    With a batch or chat prompt the prompts are not known yet: ``ids`` is empty.
    """
    later = request.prompt.later
    need_text = (
        later
        or not request.prompt.ids
        or any(
            not part.strip().isdigit()
            for item in request.stop.stop
            for part in str(item).split(",")
            if part.strip()
        )
    )
    path, kind, config, tokenizer = _model_files(source, control, need_text)
    stop = agree(control, stop_ids, request.stop, tokenizer, config)
    if request.prompt.chat is not None:  # each rank renders the question with its template
        template = agree(
            control, chat_template, path, hint="give a plain prompt with --prompt instead"
        )
        same_as_root(
            control,
            digest(template.source),
            lambda mine, root: (
                f"{path}: the chat template differs from rank 0's (sha256 {mine}, "
                f"rank 0 {root}): give every rank the same model"
            ),
        )
    if later:
        return Request(path, kind, config, tokenizer, [], stop)  # prompts come later
    prompt = request.prompt
    file = prompt.file
    if file and not prompt.ids:  # read on rank 0 only: every rank gets its text
        text = control.agree(lambda: read_prompt_file(file), catch=runtime.UsageError)
        prompt = replace(prompt, text=text, file=None)
    ids = agree(control, prompt_ids, prompt, tokenizer, config)
    new = request.max_new_tokens
    if len(ids) + new > config.max_position_embeddings:
        raise runtime.UsageError(
            f"prompt ({len(ids)} tokens) + --max-new-tokens {new} exceeds the model context of "
            f"{config.max_position_embeddings} tokens"
        )
    return Request(path, kind, config, tokenizer, ids, stop)


def prepare_chat(source: ModelSource, control: ControlPlane):
    """``llm chat``'s checks before any weight is read, agreed by every rank: the model path,
    its config, its tokenizer (required) and its chat template, each the same on every rank.

    Returns
    -------
    (Request, ChatTemplate)
        The request has no prompt ids (the turns come later) and stops at the model's EOS ids.
    """
    hint = "chat needs the model's tokenizer (tokenizer.json or tokenizer.model)"
    path, kind, config, tokenizer = _model_files(source, control, True, hint=hint)
    template = agree(control, chat_template, path)
    same_on_every_rank(control, f"has one of sha256 {digest(template.source)}", "chat template")
    control.agree(lambda: check_template(template))  # rendered on rank 0, outcome agreed
    return Request(path, kind, config, tokenizer, [], set(config.eos_ids)), template


def check_kv_capacity(model, prompt_tokens: int, new_tokens: int, capacity: int | None, log):
    """Before prefill: the prompt must fit the KV cache; warn if the new tokens will not.

    Returns the capacity (slots per core) to start the cache with.
    """
    need = model.capacity_for(prompt_tokens + new_tokens)
    if capacity is None:
        return need
    rows = model.layouts["decode"].py
    prompt_slots = math.ceil(prompt_tokens / rows)  # the prompt is spread over the rows
    if capacity < prompt_slots:
        raise runtime.UsageError(
            f"--kv-capacity {capacity} is too small for the prompt: {prompt_tokens} tokens "
            f"need {prompt_slots} slots per core on {rows} rows (prompt + new tokens need "
            f"{need})"
        )
    if capacity < need:
        log.warning(
            f"--kv-capacity {capacity} holds fewer than the prompt + "
            f"{new_tokens} new tokens ({need} slots per core needed): generation stops "
            "when the KV cache is full (stopped_by kv_full)"
        )
    return capacity

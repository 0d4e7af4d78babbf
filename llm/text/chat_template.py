"""A model's own chat template: the Jinja text that turns a list of messages into a prompt.

HF models keep it in ``chat_template.jinja`` beside the tokenizer (as current transformers saves
it; it wins over the older place) or as ``chat_template`` in ``tokenizer_config.json`` (a GGUF
file keeps it as ``tokenizer.chat_template``; :mod:`llm.storage.gguf_tokenizer` writes it to
``tokenizer_config.json`` of the shard set). It is rendered the way transformers renders it: a
sandboxed Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``raise_exception``
and ``strftime_now`` helpers, a ``tojson`` filter, and the special tokens (``bos_token``,
``eos_token``) as variables. Rendering needs ``jinja2`` (the ``chat`` extra): templates are
Jinja programs, and no smaller reader would render every model's template faithfully.

A template is a program from the model's files, so a render is bounded: at most
:data:`MAX_RENDER_SECONDS` of time (checked on every line the compiled template runs) and
:data:`MAX_RENDER_CHARS` characters of output; repetitions (``*``, ``**``, ``%`` widths) and
calls with integer arguments beyond that size are refused before they allocate. A template
over a bound fails with :class:`ChatTemplateError`, never hangs.

A message is ``{"role": "system" | "user" | "assistant", "content": str}``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

CONFIG_NAME = "tokenizer_config.json"
#: The template file beside the tokenizer, as transformers (4.50 and later) saves it.
TEMPLATE_NAME = "chat_template.jinja"
ROLES = ("system", "user", "assistant")
#: Longest a render may run, in seconds (real templates take milliseconds).
MAX_RENDER_SECONDS = 2.0
#: Most characters a render may produce (a full 128k-token context is well below it).
MAX_RENDER_CHARS = 2_000_000
#: The compiled code of a Jinja template carries this file name.
_JINJA_CODE = "<template>"
_MAX_EXPONENT = 4096
_MAX_POWER_BITS = 1 << 16
_PERCENT_WIDTH = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(?:\*|\d{7,})")


class ChatTemplateError(ValueError):
    """No chat template, an unusable one, or messages it cannot render."""


class NoChatTemplate(ChatTemplateError):
    """The model has no chat template at all (a base model): a plain prompt is the way in."""


class _OverBound(Exception):
    """A render went over one of the bounds (raised inside the template's code)."""


def _too_big(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS


def _check_args(args, kwargs) -> None:
    """Refuse a call whose integer arguments exceed the output bound (widths, repeats)."""
    for value in (*args, *kwargs.values()):
        if _too_big(value):
            raise _OverBound(f"an argument of {value} is beyond {MAX_RENDER_CHARS} characters")


def _guard_filter(fn):
    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
    def guarded(*args, **kwargs):
        _check_args(args, kwargs)
        return fn(*args, **kwargs)

    return guarded


def _check_binop(operator: str, left, right) -> None:
    """Refuse ``*``, ``**`` and ``%`` that would build a value beyond the bounds."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                if len(seq) * n > MAX_RENDER_CHARS:
                    raise _OverBound(f"a repetition of {len(seq)} x {n} items")
    elif operator == "**":
        if isinstance(right, (int, float)) and abs(right) > _MAX_EXPONENT:
            raise _OverBound(f"an exponent of {right}")
        if isinstance(left, int) and isinstance(right, int) and right > 0:
            if right * abs(left).bit_length() > _MAX_POWER_BITS:
                raise _OverBound(f"a power of {right} of a {abs(left).bit_length()}-bit number")
    elif operator == "%" and isinstance(left, str):
        values = right if isinstance(right, tuple) else (right,)
        if _PERCENT_WIDTH.search(left) or any(_too_big(v) for v in values):
            raise _OverBound("a %-format width beyond the output bound")


@contextmanager
def _time_bound(seconds: float):
    """Raise :class:`_OverBound` in the template's code once ``seconds`` have passed.

    A trace function checks the clock on each line the compiled template runs and on each
    Python call it makes (loops over ``range`` run no other Python code); the thread's
    previous trace function is put back afterwards.
    """
    deadline = time.monotonic() + seconds

    def check():
        if time.monotonic() > deadline:
            raise _OverBound(f"it ran for more than {seconds:g} s")

    def on_line(frame, event, arg):
        check()
        return on_line

    def on_call(frame, event, arg):
        check()
        return on_line if frame.f_code.co_filename == _JINJA_CODE else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def check_messages(messages) -> list[dict]:
    """Validate ``[{"role": ..., "content": ...}, ...]``; returns plain dicts.

    Raises :class:`ChatTemplateError` naming the first bad message.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ChatTemplateError(
                f"message {i} must be an object with exactly 'role' and 'content'"
            )
        if m["role"] not in ROLES:
            raise ChatTemplateError(
                f"message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}"
            )
        if not isinstance(m["content"], str):
            raise ChatTemplateError(f"message {i}: content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _special_token_text(value):
    """``"<s>"`` or ``{"content": "<s>", ...}`` (both occur in tokenizer_config.json) -> text."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatTemplate:
    """A Jinja chat template with the special tokens it may refer to.

    Parameters
    ----------
    source : str
        The template text.
    special_tokens : dict, optional
        ``{"bos_token": "<s>", "eos_token": "</s>", ...}``: variables of the template.
    """

    def __init__(self, source: str, special_tokens: dict | None = None):
        try:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ChatTemplateError(
                "chat templates need jinja2: pip install "
                "'waferllm-mpi[chat]' (or pip install jinja2)"
            ) from None

        def raise_exception(message):
            raise ChatTemplateError(f"the chat template refused the messages: {message}")

        def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(
                value,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )

        class BoundedEnvironment(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(("*", "**", "%"))

            def call_binop(self, context, operator, left, right):
                _check_binop(operator, left, right)
                return super().call_binop(context, operator, left, right)

            def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's names
                _check_args(args, kwargs)
                return super().call(__context, __obj, *args, **kwargs)

        env = BoundedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.filters = {name: _guard_filter(fn) for name, fn in env.filters.items()}
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            with _time_bound(MAX_RENDER_SECONDS):  # compiling folds constant expressions
                self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not parse: {e}") from None
        except (_OverBound, RecursionError, MemoryError) as e:
            raise ChatTemplateError(f"the chat template does not compile: {_reason(e)}") from None
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._timed_out: str | None = None  # a render ran out of time: the next fail at once

    @classmethod
    def from_model_dir(cls, model_dir) -> ChatTemplate:
        """The template of a model directory or shard set: its ``chat_template.jinja`` if
        there is one, else ``chat_template`` in its ``tokenizer_config.json`` (which also
        gives the special tokens)."""
        path, jinja_path = Path(model_dir) / CONFIG_NAME, Path(model_dir) / TEMPLATE_NAME
        if not path.is_file() and not jinja_path.is_file():
            raise NoChatTemplate(
                f"{model_dir} has neither {TEMPLATE_NAME} nor {CONFIG_NAME}, so no chat "
                "template (a model converted from GGUF or from an HF chat model has one)"
            )
        return cls.from_files(
            {n: p for n, p in ((CONFIG_NAME, path), (TEMPLATE_NAME, jinja_path)) if p.is_file()},
            str(model_dir),
        )

    @classmethod
    def from_files(cls, files: dict, where: str = "the model") -> ChatTemplate:
        """The template of a model's files ``{name: Path or bytes}``: ``chat_template.jinja``
        if given, else ``chat_template`` of ``tokenizer_config.json`` (special tokens from the
        latter). :class:`NoChatTemplate` if neither holds one."""

        def text(name: str) -> str | None:
            content = files.get(name)
            if content is None:
                return None
            try:
                data = content if isinstance(content, bytes) else Path(content).read_bytes()
                return data.decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"cannot read {name} of {where}: {e}") from None

        config_text, source = text(CONFIG_NAME), text(TEMPLATE_NAME)
        cfg: dict = {}
        if config_text is not None:
            try:
                cfg = json.loads(config_text)
            except ValueError as e:
                raise ChatTemplateError(f"{CONFIG_NAME} of {where} is not JSON: {e}") from None
            if not isinstance(cfg, dict):
                raise ChatTemplateError(f"{CONFIG_NAME} of {where} is not a JSON object")
        if source is not None:
            if not source.strip():
                raise ChatTemplateError(f"{TEMPLATE_NAME} of {where} is empty")
        else:
            source = cfg.get("chat_template")
            if isinstance(source, list):  # named templates: take the default one
                named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
                source = named.get("default")
            if not isinstance(source, str) or not source:
                raise NoChatTemplate(
                    f"{CONFIG_NAME} of {where} has no chat_template: this model has no chat format"
                )
        specials = {
            k: _special_token_text(cfg.get(k))
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return cls(source, specials)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``, ending with the assistant's turn opener if asked."""
        import jinja2

        messages = check_messages(messages)
        if self._timed_out is not None:  # a batch of many requests pays the time bound once
            raise ChatTemplateError(self._timed_out)
        parts, size = [], 0
        try:
            with _time_bound(MAX_RENDER_SECONDS):
                for part in self._template.generate(
                    messages=messages,
                    add_generation_prompt=add_generation_prompt,
                    tools=None,
                    documents=None,
                    **self.special_tokens,
                ):
                    size += len(part)
                    if size > MAX_RENDER_CHARS:
                        raise _OverBound(f"its output is longer than {MAX_RENDER_CHARS} characters")
                    parts.append(part)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from None
        except (_OverBound, RecursionError, MemoryError) as e:
            message = f"the chat template is over its bounds: {_reason(e)}"
            if isinstance(e, _OverBound) and e.args[0].startswith("it ran for"):
                self._timed_out = message
            raise ChatTemplateError(message) from None
        except Exception as e:  # noqa: BLE001 - any error of the model's program is bad input
            raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {e}") from None
        return "".join(parts)

    def check(self) -> None:
        """Render a one-question conversation, as every chat starts (``ChatTemplateError`` if
        the template cannot, e.g. over its bounds)."""
        self.render(chat_messages("Hello!"))


def _reason(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "it recurses too deeply"
    if isinstance(e, MemoryError):
        return "it runs out of memory"
    return str(e)


def chat_messages(question: str, system: str | None = None) -> list[dict]:
    """``[{"role": "system", ...}?, {"role": "user", "content": question}]``."""
    out = [] if system is None else [{"role": "system", "content": system}]
    return out + [{"role": "user", "content": question}]

"""A model's own chat template: the Jinja text that turns a list of messages into a prompt.

HF models keep it as ``chat_template`` in ``tokenizer_config.json`` (a GGUF file keeps it as
``tokenizer.chat_template``; :mod:`llm.storage.gguf_tokenizer` writes it to
``tokenizer_config.json`` of
the shard set). It is rendered the way transformers renders it: a sandboxed Jinja environment
with ``trim_blocks`` and ``lstrip_blocks``, the ``raise_exception`` and ``strftime_now``
helpers, a ``tojson`` filter, and the special tokens (``bos_token``, ``eos_token``) as
variables. Rendering needs ``jinja2`` (the ``chat`` extra): templates are Jinja programs, and
no smaller reader would render every model's template faithfully.

A message is ``{"role": "system" | "user" | "assistant", "content": str}``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

CONFIG_NAME = "tokenizer_config.json"
ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """No chat template, an unusable one, or messages it cannot render."""


class NoChatTemplate(ChatTemplateError):
    """The model has no chat template at all (a base model): a plain prompt is the way in."""


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

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template does not parse: {e}") from None
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    @classmethod
    def from_model_dir(cls, model_dir) -> ChatTemplate:
        """The template of a model directory or shard set (its ``tokenizer_config.json``)."""
        path = Path(model_dir) / CONFIG_NAME
        if not path.is_file():
            raise NoChatTemplate(
                f"{model_dir} has no {CONFIG_NAME}, so no chat template (a model "
                "converted from GGUF or from an HF chat model has one)"
            )
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ChatTemplateError(f"cannot read {path}: {e}") from None
        source = cfg.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            raise NoChatTemplate(f"{path} has no chat_template: this model has no chat format")
        specials = {
            k: _special_token_text(cfg.get(k))
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        return cls(source, specials)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        """The prompt text of ``messages``, ending with the assistant's turn opener if asked."""
        import jinja2

        messages = check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from None


def chat_messages(question: str, system: str | None = None) -> list[dict]:
    """``[{"role": "system", ...}?, {"role": "user", "content": question}]``."""
    out = [] if system is None else [{"role": "system", "content": system}]
    return out + [{"role": "user", "content": question}]

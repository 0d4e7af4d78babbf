"""Chat: ``generate --chat "question"`` and the interactive ``python -m llm chat``.

Both render the conversation with the model's own chat template (:mod:`llm.text.chat_template`).

``llm chat`` is a multi-turn session. Rank 0 reads the terminal (one line per user turn; the
commands of :mod:`llm.cli.chat`; end of input ends the session, but under ``mpiexec`` Open MPI
does not pass the end of piped input on to rank 0, so a script must end with ``/exit``),
broadcasts each line on the control plane, and every rank runs the mesh. A reply can be
stopped between two decode steps (``stop`` of :meth:`ChatSession.ask`). The KV cache lives
across turns: a new turn feeds only the tokens the cache does not hold yet (the previous
reply's last token and the new turn's template text), at positions following the old ones, so
an old turn is never prefilled again.
The first turn of a conversation goes through the prefill engine; later turns through decode
steps (:meth:`llm.engine.model.MeshModel.prefill` at a position > 0).

How the new tokens are found: the cache holds the ids ``fed`` (plus the last reply token,
``pending``, which was picked but not fed yet). The new conversation text is rendered in full;
if it starts with the text of ``fed + pending``, only the rest is tokenized and fed. Otherwise
(a template that rewrites history) the conversation is prefilled again from the start, and the
log says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshrt import runtime

if TYPE_CHECKING:
    from .generate import Generation

DEFAULT_CONTEXT = 2048


def chat_prompt_ids(
    model_dir, tokenizer, question: str, system: str | None = None, plane=None
) -> list:
    """Token ids of a one-question conversation, ending with the assistant's turn opener.

    The template is rendered on rank 0 of ``plane`` (a :class:`~meshrt.runtime.ControlPlane`;
    ``None``: one process) and the ids are broadcast, so a render over its bounds fails on every
    rank alike (``UsageError``)."""
    from .preflight import chat_template

    template = chat_template(model_dir, hint="give a plain prompt with --prompt instead")
    plane = runtime.ControlPlane.single() if plane is None else plane
    return plane.agree(lambda: encode_chat(template, tokenizer, chat_messages(question, system)))


def chat_messages(question: str, system: str | None = None) -> list:
    """See :func:`llm.text.chat_template.chat_messages`."""
    from ..text.chat_template import chat_messages as messages

    return messages(question, system)


def render_chat(template, messages) -> str:
    """``template.render(messages)``, a ``UsageError`` if the template fails or goes over its
    bounds (time, output size)."""
    from ..text.chat_template import ChatTemplateError

    try:
        return template.render(messages)
    except ChatTemplateError as e:
        raise runtime.UsageError(str(e)) from None


def encode_chat(template, tokenizer, messages) -> list:
    """Token ids of ``messages`` rendered by ``template`` (see :func:`render_chat`)."""
    return list(tokenizer.encode(render_chat(template, messages), add_special_tokens=False))


@dataclass
class Turn:
    """What one chat turn did."""

    fed_ids: list  # tokens fed to the model this turn (the new ones only)
    cached: int  # tokens the KV cache already held
    reprefilled: bool  # the conversation had to be prefilled again from the start
    generation: Generation


class ChatSession:
    """A conversation on a :class:`~llm.engine.model.MeshModel` with a KV cache kept across turns.

    Parameters
    ----------
    model : MeshModel
    tokenizer
        ``encode``/``decode`` (``skip_special_tokens`` aware).
    template : ChatTemplate
    sampler : Sampler
    stop_ids : set of int
    max_new_tokens : int
        Limit per reply.
    context : int
        Tokens the session's KV cache holds; a turn that would not fit starts a new
        conversation (system message kept).
    system : str, optional
    """

    def __init__(
        self,
        model,
        tokenizer,
        template,
        sampler,
        stop_ids,
        max_new_tokens: int,
        context: int,
        system: str | None = None,
    ):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.sampler, self.stop_ids = sampler, set(stop_ids)
        self.max_new_tokens, self.context = int(max_new_tokens), int(context)
        self.system = system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation; a fresh KV cache."""
        self.messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        self.fed: list[int] = []
        self.pending: int | None = None
        self.model.start(self.model.capacity_for(self.context))

    def _new_ids(self, text: str) -> tuple[list, bool]:
        have = self.fed + ([] if self.pending is None else [self.pending])
        if have:
            have_text = self.tokenizer.decode(have, skip_special_tokens=False)
            if text.startswith(have_text):
                rest = text[len(have_text) :]
                ids = self.tokenizer.encode(rest, add_special_tokens=False) if rest else []
                return ([] if self.pending is None else [self.pending]) + list(ids), False
        return list(self.tokenizer.encode(text, add_special_tokens=False)), bool(have)

    def ask(self, question: str, on_token=None, stop=None) -> Turn:
        """One user turn: feed the new tokens, generate the reply (``on_token`` per token).

        ``stop()`` is asked before each decode step, alike on every rank (see
        :func:`~llm.serve.generate.generate`); a reply it stops stays in the conversation as
        far as it got."""
        from .generate import generate

        # rendered on rank 0 only, the outcome broadcast: a bound on time must not split ranks
        plane = self.model.control
        messages = self.messages + [{"role": "user", "content": question}]
        ids, rewrite = plane.agree(lambda: self._new_ids(render_chat(self.template, messages)))
        if rewrite or len(self.fed) + len(ids) + self.max_new_tokens > self.context:
            if not rewrite:  # the conversation is full: start again with this question
                self.messages = self.messages[:1] if self.system is not None else []
                messages = self.messages + [{"role": "user", "content": question}]
            self.model.start(self.model.capacity_for(self.context))
            self.fed, self.pending = [], None
            ids = plane.agree(lambda: encode_chat(self.template, self.tokenizer, messages))
            rewrite = True
            if len(ids) + self.max_new_tokens > self.context:
                raise runtime.UsageError(
                    f"this turn ({len(ids)} tokens) + --max-new-tokens "
                    f"{self.max_new_tokens} does not fit the session "
                    f"context of {self.context} tokens (--context)"
                )
        cached = len(self.fed)
        gen = generate(
            self.model,
            ids,
            self.max_new_tokens,
            self.sampler,
            self.stop_ids,
            on_token,
            fresh=False,
            stop=stop,
        )
        self.fed += ids + gen.new_ids[:-1]
        self.pending = gen.new_ids[-1]
        reply = [t for t in gen.new_ids if t not in self.stop_ids]
        self.messages = messages + [{"role": "assistant", "content": self.tokenizer.decode(reply)}]
        return Turn(ids, cached, rewrite, gen)

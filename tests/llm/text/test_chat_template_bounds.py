"""A chat template is a program from the model's files: its render is bounded in time and size,
and a template saved beside the tokenizer (``chat_template.jinja``) is read."""

import json
import time

import pytest

from llm.text.chat_template import (
    MAX_RENDER_CHARS,
    MAX_RENDER_SECONDS,
    ChatTemplate,
    ChatTemplateError,
    NoChatTemplate,
)

pytest.importorskip("jinja2")

HELLO = [{"role": "user", "content": "hi"}]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: The issue's case: two nested loops of 100,000 (the sandbox's largest range) run ~forever.
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
OVER_BOUNDS = {
    "nested loops": NESTED_LOOPS,
    "nested loops with output": (
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}"
    ),
    "repetition": "{{ 'x' * 10000000000 }}",
    "repetition of a variable": "{% set n = 100000 %}{{ 'x' * n * n }}",
    "power": "{{ 10 ** 4000 ** 4000 }}",
    "filter width": "{{ 'x'|center(10000000000) }}",
    "method width": "{{ 'x'.ljust(10000000000) }}",
    "percent width": "{{ '%01000000000d' % 1 }}",
    "percent star": "{{ '%*d' % (1000000000, 1) }}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "long output": "{{ range(100000)|join('x' * 30) }}",
}


@pytest.mark.parametrize("source", OVER_BOUNDS.values(), ids=OVER_BOUNDS.keys())
def test_a_template_over_its_bounds_fails_in_bounded_time(source):
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="bounds|compile"):
        ChatTemplate(source).render(HELLO)
    assert time.monotonic() - t0 < MAX_RENDER_SECONDS + 3


def test_a_template_that_ran_out_of_time_fails_at_once_next_time():
    """A batch of many chat requests pays the time bound once, not once per request."""
    template = ChatTemplate(NESTED_LOOPS)
    with pytest.raises(ChatTemplateError, match="more than"):
        template.render(HELLO)
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match="more than"):
        template.render([{"role": "user", "content": "another"}])
    assert time.monotonic() - t0 < 0.5


def test_bounds_leave_ordinary_templates_alone():
    template = ChatTemplate(
        CHATML + "{% for i in range(3) %}{{ loop.index0 % 2 }}{% endfor %}{{ 'ab' * 2 }}"
        "{{ 2 ** 10 }}{{ '%5d' % 7 }}"
    )
    long = [{"role": "user", "content": "w " * 100_000}]  # a long conversation still renders
    assert len(template.render(long)) > 200_000
    assert template.render(HELLO).endswith("<|im_start|>assistant\n010abab1024    7")
    with pytest.raises(ChatTemplateError, match="refused the messages: no"):
        ChatTemplate("{{ raise_exception('no') }}").render(HELLO)
    assert MAX_RENDER_CHARS >= 1_000_000


def test_the_previous_trace_function_is_kept():
    import sys

    calls = []

    def tracer(frame, event, arg):
        calls.append(event)

    sys.settrace(tracer)
    try:
        ChatTemplate(CHATML).render(HELLO)
        after = sys.gettrace()
    finally:
        sys.settrace(None)
    assert after is tracer


def test_chat_template_jinja_beside_the_tokenizer(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    with pytest.raises(NoChatTemplate):
        ChatTemplate.from_model_dir(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}" + CHATML)
    template = ChatTemplate.from_model_dir(tmp_path)
    assert template.render(HELLO) == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # the file wins over an entry in tokenizer_config.json, as in transformers
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old"}))
    assert ChatTemplate.from_model_dir(tmp_path).render(HELLO).startswith("<|im_start|>")
    (tmp_path / "tokenizer_config.json").unlink()  # the file alone is enough
    assert ChatTemplate.from_model_dir(tmp_path).render(HELLO).startswith("<|im_start|>")
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(NoChatTemplate, match="chat_template.jinja"):
        ChatTemplate.from_model_dir(tmp_path)

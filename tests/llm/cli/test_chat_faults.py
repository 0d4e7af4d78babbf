"""``llm chat`` and ``generate --chat`` on bad chat templates, and the chat's own commands.

A template that loops ~forever (two nested ``range(100000)``) must end every command with one
``error:`` line within the render bound, on 1 and 2 ranks, and ``convert`` must refuse it.
"""

import json
import shutil
import subprocess
import sys

import pytest
from faultcase import ENV, MPIEXEC, ROOT, assert_one_error, run
from gguf_fixture import write_tiny_gguf

pytest.importorskip("jinja2")

FIX = ROOT / "tests" / "fixtures" / "tiny-llama-gqa"
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def hf_copy(tmp_path, template: str):
    """The tiny HF fixture with ``template`` in ``chat_template.jinja`` (transformers' place)."""
    d = tmp_path / "model"
    shutil.copytree(FIX, d)
    (d / "chat_template.jinja").write_text(template)
    return d


@pytest.mark.parametrize("n", [None, 2], ids=["1 process", "2 ranks"])
@pytest.mark.parametrize("command", ["chat", "generate --chat"])
def test_a_looping_template_ends_with_one_error(command, n, tmp_path):
    if n and not MPIEXEC:
        pytest.skip("no mpiexec")
    model = hf_copy(tmp_path, NESTED_LOOPS)
    args = ["chat", "--model", model] if command == "chat" else ["generate", "--model", model]
    if command != "chat":
        args += ["--chat", "hello", "--max-new-tokens", "2"]
    p, dt = run(args, n=n, timeout=120)
    assert_one_error(p, dt, "chat template", "more than 2 s", within=40)


def test_convert_refuses_a_gguf_whose_template_loops(tmp_path):
    pytest.importorskip("gguf")
    write_tiny_gguf(tmp_path / "loop.gguf", chat_template=NESTED_LOOPS)
    out = tmp_path / "shards"
    p, dt = run(["convert", tmp_path / "loop.gguf", "--out", out, "--decode-mesh", "2x2"])
    assert_one_error(p, dt, "chat template is unusable", "more than 2 s", within=40)
    assert not out.exists()


def test_chat_template_jinja_travels_with_the_shards(tmp_path):
    model = hf_copy(tmp_path, CHATML)
    out = tmp_path / "shards"
    p, _ = run(["convert", model, "--out", out, "--decode-mesh", "2x2"], timeout=120)
    assert p.returncode == 0, p.stderr
    assert (out / "chat_template.jinja").read_text() == CHATML
    p, _ = run(["generate", "--model", out, "--chat", "hi", "--max-new-tokens", "2", "--json"])
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert len(rec["new_ids"]) >= 1 and rec["prompt_tokens"] > 5


def chat_session(model, script: str, *extra, n=None, timeout=120):
    """``llm chat`` with ``script`` on stdin (one process, or ``mpiexec -n n``)."""
    cmd = ([MPIEXEC, "-n", str(n)] if n else []) + [sys.executable, "-m", "mpi4py", "-m", "llm"]
    cmd += ["chat", "--model", str(model), "--max-new-tokens", "3", *extra]
    return subprocess.run(
        cmd, cwd=ROOT, env=ENV, input=script, capture_output=True, text=True, timeout=timeout
    )


def test_end_of_input_ends_the_chat_cleanly(tmp_path):
    model = hf_copy(tmp_path, CHATML)
    p = chat_session(model, "hello\n", "--json")  # no /exit: end of input
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["turn"] for line in p.stdout.splitlines()] == [1]


def test_a_turn_that_cannot_be_sent_leaves_the_chat_going(tmp_path):
    """A turn longer than the session context, or one the template refuses, is reported and
    the chat goes on (it used to end the session with exit 2)."""
    template = "{% if messages[-1].content == 'refuse me' %}{{ raise_exception('no') }}{% endif %}"
    model = hf_copy(tmp_path, template + CHATML)
    script = "w " * 200 + "\nrefuse me\nhello\n/exit\n"
    p = chat_session(model, script, "--json", "--context", "64", "--max-new-tokens", "4")
    assert p.returncode == 0, p.stderr
    assert [json.loads(line)["turn"] for line in p.stdout.splitlines()] == [1]
    assert "[not sent: this turn" in p.stderr and "context of 64 tokens" in p.stderr
    assert "[not sent: the chat template refused the messages: no]" in p.stderr


def test_slash_commands_are_answered_locally(tmp_path):
    model = hf_copy(tmp_path, CHATML)
    p = chat_session(model, "/help\n/frobnicate now\nhello\n//not a command\n/exit\n", "--json")
    assert p.returncode == 0, p.stderr
    turns = [json.loads(line) for line in p.stdout.splitlines()]
    # only two turns reached the model: "hello" and "/not a command" (a doubled slash)
    assert [t["turn"] for t in turns] == [1, 2]
    assert "/reset" in p.stderr and "/exit" in p.stderr  # the help text
    assert "unknown command /frobnicate" in p.stderr

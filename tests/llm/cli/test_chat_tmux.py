"""``mpiexec -n 2 python -m mpi4py -m llm chat`` in a real terminal (tmux), as a person uses it.

Keys are sent with ``tmux send-keys`` and the screen is read with ``capture-pane``: a question,
``/help``, an unknown ``/command``, Ctrl-C in the middle of a reply (the chat goes on), end of
input (Ctrl-D: exit 0), and in a second session Ctrl-C twice (exit 0). While the chat waits at
the prompt, rank 1 must sleep. The command runs once as the pane's own command (mpiexec in an
orphaned process group, as under ``bash -c``) and once typed into an interactive shell with job
control, where mpiexec keeps the terminal (:mod:`llm.cli.terminal`); there the shell must get
the terminal back as it was after each chat. Without tmux the test is skipped, unless
``REQUIRE_TMUX=1`` (as in CI, which installs it) makes that a failure.

The model is the tiny HF fixture with a ChatML template in ``chat_template.jinja``; its EOS is
set to ``<unk>`` (id 0), which its greedy replies never produce, and its context to 4096, so a
reply runs until Ctrl-C (or --max-new-tokens) and there is time to interrupt it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faultcase import ENV, MPIEXEC, ROOT

pytest.importorskip("jinja2")

FIX = ROOT / "tests" / "fixtures" / "tiny-llama-gqa"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TMUX = shutil.which("tmux")
if TMUX is None:
    if os.environ.get("REQUIRE_TMUX") == "1":
        raise RuntimeError("REQUIRE_TMUX=1 but tmux is not installed (apt-get install tmux)")
    pytest.skip("tmux is not installed (apt-get install tmux)", allow_module_level=True)
if not os.path.exists(MPIEXEC):
    pytest.skip("no mpiexec in the venv", allow_module_level=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("tmuxchat") / "model"
    shutil.copytree(FIX, d)
    (d / "chat_template.jinja").write_text(CHATML)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((d / name).read_text())
        cfg["eos_token_id"] = 0  # never produced: replies run until stopped
        if "max_position_embeddings" in cfg:
            cfg["max_position_embeddings"] = 4096  # room for long replies
        (d / name).write_text(json.dumps(cfg))
    return d


class Pane:
    """One tmux server (a private socket) running one command in a terminal of 200x50 (``None``:
    an interactive bash, with job control, prompt :data:`PROMPT`)."""

    def __init__(self, tmp: Path, command: str | None):
        self.socket = str(tmp / "tmux.sock")
        env = {**ENV, "TERM": "xterm"}
        if command is None:
            rc = tmp / "bashrc"
            rc.write_text(f"PS1={shlex.quote(PROMPT)}\n")
            command = f"bash --rcfile {shlex.quote(str(rc))} -i"
        else:
            command = f"cd {shlex.quote(str(ROOT))} && {command}; echo EXIT=$?; sleep 600"
        self.tmux(
            "new-session", "-d", "-s", "chat", "-x", "200", "-y", "50", command, env=env
        )  # fmt: skip
        self.tmux("set-option", "-t", "chat", "history-limit", "5000")

    def tmux(self, *args, env=None) -> str:
        p = subprocess.run(
            [TMUX, "-S", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=20,
            env=env,
        )
        assert p.returncode == 0, f"tmux {args[0]}: {p.stderr}"
        return p.stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "chat", *keys)

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-5000", "-t", "chat")

    def wait(self, predicate, what: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.screen()
            if predicate(text):
                return text
            if "EXIT=" in text:
                break  # the command ended: nothing more will come
            time.sleep(0.2)
        raise AssertionError(f"no {what} within {timeout:.0f} s; the screen:\n{self.screen()}")

    def wait_for(self, phrase: str, count: int = 1, timeout: float = 60.0) -> str:
        return self.wait(lambda t: t.count(phrase) >= count, f"{count} x {phrase!r}", timeout)

    def ranks(self, marker: str) -> dict[int, int]:
        """``{MPI rank: pid}`` of the processes whose command line holds ``marker``."""
        out = {}
        for proc in Path("/proc").iterdir():
            try:
                if not proc.name.isdigit() or marker not in (proc / "cmdline").read_text():
                    continue
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for var in environ:
                if var.startswith(b"OMPI_COMM_WORLD_RANK="):
                    out[int(var.split(b"=")[1])] = int(proc.name)
        return out

    def close(self) -> None:
        subprocess.run([TMUX, "-S", self.socket, "kill-server"], capture_output=True, timeout=20)


#: The interactive shell's prompt.
PROMPT = "shell$ "


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chat_command(model: Path) -> str:
    cmd = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "llm", "chat"]
    cmd += ["--model", str(model), "--max-new-tokens", "1500"]
    return shlex.join(cmd)


def reply_started(question: str):
    """The screen shows some 20 characters of the reply to ``question``."""

    def started(text: str) -> bool:
        lines = text.splitlines()
        asked = [i for i, line in enumerate(lines) if line.endswith("you> " + question)]
        return bool(asked) and any(len(line) >= 20 for line in lines[asked[-1] + 1 :])

    return started


def interrupt_reply(pane: Pane, question: str, stopped_before: int) -> None:
    pane.keys("-l", question)
    pane.keys("Enter")
    pane.wait(reply_started(question), f"the reply to {question!r}", timeout=90)
    pane.keys("C-c")
    text = pane.wait_for("[reply stopped", stopped_before + 1, timeout=30)
    assert "tokens (interrupted)" in text
    pane.wait(lambda t: t.rstrip().endswith("you>"), "the prompt after the stopped reply")


def test_chat_in_a_terminal(model, tmp_path):
    pane = Pane(tmp_path, chat_command(model))
    try:
        pane.wait_for("you> ", timeout=120)  # the model loaded; rank 0 reads the terminal
        pane.keys("/help", "Enter")
        pane.wait_for("/reset   start a new conversation")
        pane.keys("/frobnicate now", "Enter")
        pane.wait_for("unknown command /frobnicate")

        # at the prompt, rank 1 sleeps (a spinning broadcast used ~1 s of CPU per second)
        ranks = pane.ranks(str(model))
        assert sorted(ranks) == [0, 1], ranks
        before = cpu_seconds(ranks[1])
        time.sleep(3.0)
        idle = cpu_seconds(ranks[1]) - before
        assert idle < 0.3, f"rank 1 used {idle:.2f} s of CPU in 3 s at the prompt"

        interrupt_reply(pane, "tell me a story", 0)
        interrupt_reply(pane, "and then?", 1)  # the chat goes on after a stopped reply
        pane.keys("/help", "Enter")  # a line between: the next Ctrl-C would not leave
        pane.wait_for("/reset   start a new conversation", 2)
        pane.keys("C-d")
        text = pane.wait_for("EXIT=", timeout=60)
        assert "EXIT=0" in text, text
        assert "Traceback" not in text and "error" not in text.lower(), text
        # neither command reached the model: two turns, both the questions
        assert text.count("new prompt tokens") == 2, text
    finally:
        pane.close()


def test_ctrl_c_twice_leaves(model, tmp_path):
    pane = Pane(tmp_path, chat_command(model))
    try:
        pane.wait_for("you> ", timeout=120)
        interrupt_reply(pane, "tell me a story", 0)
        pane.keys("C-c")
        text = pane.wait_for("EXIT=", timeout=60)
        assert "EXIT=0" in text, text
        assert "Traceback" not in text, text
    finally:
        pane.close()


def type_command(pane: Pane, command: str, sessions: int) -> None:
    """Type ``command`` at the shell prompt; wait for the chat's prompt (the ``sessions``-th
    chat in this shell), after a banner that offers Ctrl-C and Ctrl-D."""
    pane.keys("-l", command)
    pane.keys("Enter")
    text = pane.wait_for("/help for the commands", sessions, timeout=120)
    banner = [line for line in text.splitlines() if "/help for the commands" in line][-1]
    assert "Ctrl-C stops a reply, Ctrl-D or /exit leaves" in banner, text
    pane.wait_for("you> ", sessions, timeout=30)


def back_in_the_shell(pane: Pane, count: int, code: int = 0) -> None:
    """The chat has ended with exit code ``code``, the shell has its prompt and the terminal
    back, and the terminal's settings are those from before (``$S0``)."""
    pane.wait(lambda t: t.rstrip().endswith(PROMPT.rstrip()), "the shell's prompt", timeout=60)
    pane.keys("-l", 'echo done-$? tty-$([ "$(stty -g)" = "$S0" ] && echo same || echo changed)')
    pane.keys("Enter")
    outputs = lambda t: [line for line in t.splitlines() if line.startswith("done-")]  # noqa: E731
    text = pane.wait(lambda t: len(outputs(t)) == count, "the echo's output", timeout=20)
    assert outputs(text)[-1].split() == [f"done-{code}", "tty-same"], text
    assert "Traceback" not in text and "Stopped" not in text, text


def test_chat_typed_into_an_interactive_shell(model, tmp_path):
    """mpiexec started by a job-control shell: it keeps the terminal (the shell would stop it
    in the background), and the keys still work; the shell gets its terminal back."""
    pane = Pane(tmp_path, None)
    try:
        pane.wait(lambda t: t.rstrip().endswith(PROMPT.rstrip()), "the shell's prompt")
        pane.keys("-l", f"cd {shlex.quote(str(ROOT))} && set -m && S0=$(stty -g)")
        pane.keys("Enter")
        command = chat_command(model)

        type_command(pane, command, 1)
        pane.keys("/help", "Enter")
        pane.wait_for("/reset   start a new conversation")
        interrupt_reply(pane, "tell me a story", 0)
        interrupt_reply(pane, "and then?", 1)  # the chat goes on after a stopped reply
        pane.keys("/help", "Enter")  # a line between: the next Ctrl-C does not leave
        pane.wait_for("/reset   start a new conversation", 2)
        pane.keys("-l", "half a line")
        pane.keys("C-c")  # at the prompt: drops the line, and leaves only when pressed again
        pane.wait_for("(Ctrl-C again, Ctrl-D or /exit to leave)")
        pane.keys("C-d")
        back_in_the_shell(pane, 1)

        type_command(pane, command, 2)  # Ctrl-C twice leaves
        interrupt_reply(pane, "tell me a story", 2)
        pane.keys("C-c")
        back_in_the_shell(pane, 2)

        type_command(pane, command, 3)  # /exit, after a Ctrl-C at the prompt
        pane.keys("C-c")
        pane.wait_for("(Ctrl-C again, Ctrl-D or /exit to leave)", 2)
        pane.keys("/exit", "Enter")
        back_in_the_shell(pane, 3)

        type_command(pane, command, 4)  # rank 0 killed: the terminal's settings come back
        ranks = pane.ranks(str(model))
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[0], signal.SIGKILL)
        back_in_the_shell(pane, 4, 128 + signal.SIGKILL)
    finally:
        pane.close()

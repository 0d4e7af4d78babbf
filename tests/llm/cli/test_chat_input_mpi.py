"""``llm chat`` takes the user's turns from rank 0 alone: the other ranks never read their own
standard input (under ``mpiexec`` only rank 0's is the user's; on a cluster the others may be
anything)."""

import io
import sys

import pytest

pytestmark = pytest.mark.mpi(min_size=2)


class Unreadable(io.StringIO):
    def readline(self, *args):
        raise AssertionError("a rank other than 0 read its standard input")


def test_chat_turns_come_from_rank_0_only(monkeypatch):
    from llm.cli.chat import END, Keyboard, read_turn
    from meshrt.runtime import ControlPlane

    plane = ControlPlane.world()
    stdin = io.StringIO("what is a wafer?\n/reset\n/exit\n") if plane.is_root else Unreadable("x\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    keyboard = Keyboard(interactive=False) if plane.is_root else None  # as llm chat does
    try:
        assert read_turn(plane, keyboard) == ("say", "what is a wafer?")
        assert read_turn(plane, keyboard) == ("reset", None)
        assert read_turn(plane, keyboard) == END  # rank 0's /exit ends every rank
    finally:
        if keyboard is not None:
            keyboard.close()

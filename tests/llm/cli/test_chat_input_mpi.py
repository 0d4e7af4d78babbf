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
    from llm.cli.chat import read_line
    from meshrt.runtime import ControlPlane

    plane = ControlPlane.world()
    stdin = io.StringIO("what is a wafer?\n/exit\n") if plane.is_root else Unreadable("other\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert read_line(plane, interactive=False) == "what is a wafer?"
    assert read_line(plane, interactive=False) == "/exit"
    assert read_line(plane, interactive=False) is None  # end of rank 0's input ends every rank

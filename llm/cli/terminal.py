"""The terminal of an interactive command on rank 0, also under ``mpiexec``.

Run from a terminal, ``mpiexec`` reads the keyboard and forwards it to rank 0 through a pipe,
and it keeps Ctrl-C for itself: the terminal sends SIGINT to mpiexec's process group, and
Open MPI ends the whole job (it cannot forward SIGINT). It does not pass the end of input
(Ctrl-D) on either. So rank 0 of ``llm chat`` takes the terminal over, as a shell hands it to
a job: when its launcher is the terminal's foreground process and reads that terminal, rank 0
makes its own process group the foreground one (``tcsetpgrp``) and reads, writes and takes
signals at the terminal itself. Ctrl-C then reaches rank 0 alone, end of input is seen, and
mpiexec, now in the background, leaves the keyboard alone. :meth:`Terminal.release` gives the
terminal back (also at exit, and on SIGTERM or SIGHUP). While rank 0 holds it, Ctrl-Z is
ignored: it would stop rank 0 alone, not the job.

This needs the launcher's process group to be orphaned (no member's parent in another group
of the session), as when mpiexec runs under ``bash -c``, tmux or screen directly: a read of
the terminal from the background then fails (EIO) instead of stopping mpiexec. Started from
an interactive shell with job control, mpiexec would be stopped (SIGTTIN) the first time it
looks at the keyboard, and the shell would take the terminal back; there rank 0 leaves the
terminal to mpiexec, and Ctrl-C ends the whole job as before (leave with ``/exit``).

Outside these cases (one process on a terminal, piped input, a batch system) nothing changes.
"""

from __future__ import annotations

import atexit
import os
import signal
import sys

_TTY = "/dev/tty"
_STREAMS = (0, 1, 2)


def _controlling_terminal() -> int:
    """The device number of this process's controlling terminal (0: none), from
    ``/proc/self/stat`` (``/dev/tty`` itself names no particular terminal)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[4])  # tty_nr, the 7th field of the whole line
    except (OSError, IndexError, ValueError):
        return 0


def _stat(pid) -> tuple[int, int, int]:
    """``(ppid, pgrp, session)`` of a process, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[1]), int(fields[2]), int(fields[3])


def orphaned(group: int) -> bool:
    """Whether process group ``group`` is orphaned: no member has a parent in another group of
    the same session. Reading the terminal from the background then fails with EIO instead of
    stopping the reader with SIGTTIN, which under a job-control shell would stop mpiexec and
    hand the terminal back to the shell."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid, pgrp, session = _stat(entry)
            except (OSError, IndexError, ValueError):
                continue
            if pgrp == group:
                members.append((ppid, session))
    for ppid, session in members:
        try:
            _, parent_group, parent_session = _stat(ppid)
        except (OSError, IndexError, ValueError):
            continue  # no parent to speak of
        if parent_group != group and parent_session == session:
            return False
    return bool(members)


def _is_terminal(path: str, device: int) -> bool:
    """Whether ``path`` (a ``/proc/PID/fd/N`` link) is the terminal ``device``."""
    try:
        return device != 0 and os.stat(path).st_rdev == device
    except OSError:
        return False


def _set_foreground(fd: int, group: int) -> None:
    """Make ``group`` the foreground process group of the terminal ``fd`` (a background
    process may, with SIGTTOU blocked)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, group)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


class Terminal:
    """Rank 0's hold on its launcher's terminal (see the module docstring).

    Parameters
    ----------
    fd : int
        The terminal, open.
    foreground : int
        The process group to give the terminal back to (the launcher's).
    """

    def __init__(self, fd: int, foreground: int, device: int):
        self.fd, self.foreground, self.device = fd, foreground, device
        self.held = True
        self._saved: dict = {}

    @classmethod
    def adopt(cls) -> Terminal | None:
        """Take over the launcher's terminal if this process is a launched rank whose
        launcher reads a terminal in the foreground, in an orphaned process group; ``None``
        (nothing done) otherwise."""
        if os.name != "posix" or sys.stdin.isatty():
            return None  # not launched, or the terminal is already ours
        try:
            fd = os.open(_TTY, os.O_RDWR | os.O_NOCTTY)
        except OSError:
            return None  # no controlling terminal
        try:
            launcher = os.getppid()
            foreground = os.tcgetpgrp(fd)
            if foreground != os.getpgid(launcher) or foreground == os.getpgrp():
                raise OSError("the launcher is not the terminal's foreground job")
            device = _controlling_terminal()
            if not _is_terminal(f"/proc/{launcher}/fd/0", device):
                raise OSError("the launcher does not read this terminal")
            if not orphaned(foreground):
                raise OSError("a job-control shell would stop the launcher")
            term = cls(fd, foreground, device)
            term._take(launcher)
            return term
        except OSError:
            os.close(fd)
            return None

    def _take(self, launcher: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._saved[sig] = signal.signal(sig, self._on_end_signal)
        self._saved[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
        _set_foreground(self.fd, os.getpgrp())
        atexit.register(self.release)
        for n in _STREAMS:  # the streams the launcher would forward from or to this terminal
            if n == 0 or _is_terminal(f"/proc/{launcher}/fd/{n}", self.device):
                stream = (sys.stdin, sys.stdout, sys.stderr)[n]
                if n:
                    stream.flush()
                os.dup2(self.fd, n)
                if n and hasattr(stream, "reconfigure"):
                    stream.reconfigure(line_buffering=True)

    def _on_end_signal(self, signum, frame):
        self.release()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def release(self) -> None:
        """Give the terminal back to the launcher's process group (once)."""
        if not self.held:
            return
        self.held = False
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            _set_foreground(self.fd, self.foreground)
        except OSError:
            pass  # the launcher is gone: nothing to give back to
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        os.close(self.fd)

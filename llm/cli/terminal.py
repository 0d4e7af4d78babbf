r"""The terminal of an interactive command on rank 0, also under ``mpiexec``.

Run from a terminal, ``mpiexec`` reads the keyboard and forwards it to rank 0 through a pipe,
and it keeps Ctrl-C for itself: the terminal sends SIGINT to mpiexec's process group, and
Open MPI ends the whole job (it cannot forward SIGINT). It does not pass the end of input
(Ctrl-D) on either: it stops reading instead, and nothing typed after it reaches rank 0. So
rank 0 of ``llm chat`` takes the terminal over, in one of two ways (:meth:`Terminal.adopt`),
when its launcher is the terminal's foreground process and reads that terminal:

* The launcher's process group is orphaned (no member's parent in another group of the
  session), as when mpiexec runs under ``bash -c``, tmux or screen directly: rank 0 makes its
  own process group the foreground one (``tcsetpgrp``), as a shell hands the terminal to a
  job, and reads, writes and takes signals there itself (with line editing). Ctrl-C reaches
  rank 0 alone, and the end of input is seen. mpiexec, now in the background, may look at the
  keyboard: its read fails (EIO), as it does in an orphaned group.
* Started from an interactive shell with job control, the launcher's group is not orphaned,
  and mpiexec cannot be sent to the background: Open MPI's stdin thread keeps reading the
  terminal whichever group is in the foreground, so the first line typed would stop it
  (SIGTTIN) and the shell would take the terminal back. There mpiexec keeps the terminal and
  forwards every byte typed, and rank 0 changes what the keys send instead: Ctrl-C and
  Ctrl-D no longer signal or end the input but end the line (``stty intr undef eol ^C
  eof undef eol2 ^D susp undef``), so they reach rank 0 through mpiexec as the bytes
  ``\x03`` and ``\x04`` (:class:`Keys`), and mpiexec neither aborts the job nor stops
  reading. The kernel still edits the line (erase, ^U, ^W) and echoes it. Ctrl-\ still
  quits mpiexec, the way out of a job that no longer answers.

Either way rank 0 writes to the terminal itself, and while it holds it Ctrl-Z is ignored (it
would stop rank 0 alone, or mpiexec alone). :meth:`Terminal.release` gives the terminal
back as it was (foreground group and settings), also at exit and on SIGTERM or SIGHUP; if
rank 0 dies without it (SIGKILL, a crash), a small guard process puts the settings back.

Outside these cases (one process on a terminal, piped input, a batch system, mpiexec in the
background) nothing changes.
"""

from __future__ import annotations

import atexit
import os
import select
import signal
import subprocess
import sys
import termios

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


def _set_attributes(fd: int, attributes: list) -> None:
    """``tcsetattr`` on the terminal ``fd``, also from the background (SIGTTOU blocked)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        termios.tcsetattr(fd, termios.TCSADRAIN, attributes)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _keys_as_line_ends(attributes: list, disabled: bytes) -> tuple[list, bytes, bytes, bytes]:
    """Terminal settings in which the interrupt and end-of-file keys end a line instead of
    sending SIGINT or ending the input, and the suspend key is an ordinary one; also the three
    keys' bytes (``b""``: that key is not set). The quit key (Ctrl-\\) still ends mpiexec."""
    new = [*attributes[:6], list(attributes[6])]
    cc = new[6]
    interrupt, eof, suspend = (
        b"" if cc[key] == disabled else cc[key]
        for key in (termios.VINTR, termios.VEOF, termios.VSUSP)
    )
    new[3] |= termios.IEXTEN  # for VEOL2
    cc[termios.VEOL] = interrupt or disabled
    cc[termios.VEOL2] = eof or disabled
    for key in (termios.VINTR, termios.VEOF, termios.VSUSP):
        cc[key] = disabled
    return new, interrupt, eof, suspend


#: The guard of a terminal's settings: it reads them (a Python literal, one line), then waits
#: for the end of its input; without the word ``released`` before it, the process holding the
#: terminal died (SIGKILL, a crash), and the guard puts the settings back. In a session of its
#: own it has no controlling terminal: no job control stops it, nor does a hangup or the
#: launcher's end of the job (signals to process groups) reach it.
_GUARD = (
    "import ast, sys, termios\n"
    "attributes = ast.literal_eval(sys.stdin.readline())\n"
    "if sys.stdin.read() != 'released':\n"
    "    try:\n"
    "        termios.tcsetattr(int(sys.argv[1]), termios.TCSANOW, attributes)\n"
    "    except termios.error:\n"
    "        pass\n"
)


def _guard(fd: int, attributes: list) -> subprocess.Popen | None:
    """Start the guard of the settings ``attributes`` of the terminal ``fd`` (``None``: it
    could not be started); write ``released`` to its stdin and close it once they are back."""
    try:
        guard = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _GUARD, str(fd)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # not the launcher's pipes: it would wait for their end
            stderr=subprocess.DEVNULL,
            pass_fds=(fd,),
            start_new_session=True,
            text=True,
        )
        assert guard.stdin is not None
        guard.stdin.write(repr(attributes) + "\n")
        guard.stdin.flush()
        return guard
    except OSError:
        return None


class Keys:
    """Lines typed at a terminal that the launcher reads and forwards to rank 0's stdin, the
    interrupt and end-of-file keys arriving as bytes that end a line (see the module
    docstring).

    Parameters
    ----------
    fd : int
        Where the launcher forwards the keyboard (rank 0's stdin).
    interrupt, eof : bytes
        The interrupt (Ctrl-C) and end-of-file (Ctrl-D) keys' bytes (``b""``: none).
    ignored : bytes
        Bytes left out of the lines (the suspend key, Ctrl-Z, which does nothing here).
    """

    def __init__(self, fd: int, interrupt: bytes, eof: bytes, ignored: bytes = b""):
        self.fd = fd
        self.interrupt = interrupt[0] if interrupt else -1
        self.eof = eof[0] if eof else -1
        self.ignored = frozenset(ignored)
        self._pending = bytearray()  # received, not yet a whole line
        self._events: list = []  # ("line", str), ("interrupt", None) or ("eof", None)
        self._closed = False

    def _receive(self, data: bytes) -> None:
        if not data:
            self._closed = True
            self._events.append(("eof", None))
            return
        for byte in data:
            if byte == 0x0A:  # newline
                self._events.append(("line", self._pending.decode(errors="replace")))
                self._pending.clear()
            elif byte == self.interrupt:  # the line typed so far is dropped, as by a shell
                self._events.append(("interrupt", None))
                self._pending.clear()
            elif byte == self.eof:  # the end of input on an empty line; else nothing
                if not self._pending:
                    self._events.append(("eof", None))
            elif byte not in self.ignored:
                self._pending.append(byte)

    def _fill(self, timeout: float | None) -> None:
        """Take what the launcher forwarded, waiting up to ``timeout`` seconds for it
        (``None``: until something comes)."""
        if self._closed:
            return
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            self._receive(os.read(self.fd, 4096))

    def interrupted(self) -> bool:
        """Whether the interrupt key was pressed (the press is used up; lines typed ahead
        stay for later), without waiting."""
        self._fill(0)
        for i, (kind, _) in enumerate(self._events):
            if kind == "interrupt":
                del self._events[i]
                return True
        return False

    def read_line(self) -> str | None:
        """The next line, ``None`` at the end of input; the interrupt key raises
        :class:`KeyboardInterrupt`."""
        while not self._events:
            if self._closed:
                return None
            self._fill(None)
        kind, text = self._events.pop(0)
        if kind == "interrupt":
            raise KeyboardInterrupt
        return text


class Terminal:
    """Rank 0's hold on its launcher's terminal (see the module docstring).

    Parameters
    ----------
    fd : int
        The terminal, open.
    foreground : int
        The process group to give the terminal back to (the launcher's).
    device : int
        The terminal's device number.
    shared : bool
        Whether the launcher keeps the terminal (its process group is not orphaned): then
        :attr:`keys` reads what it forwards; else rank 0 takes the foreground.
    """

    def __init__(self, fd: int, foreground: int, device: int, shared: bool = False):
        self.fd, self.foreground, self.device = fd, foreground, device
        self.shared = shared
        self.held = True
        self.keys: Keys | None = None
        self._saved: dict = {}
        self._attributes: list | None = None
        self._streams: dict[int, int] = {}  # stdout and stderr as launched, while replaced
        self._guard: subprocess.Popen | None = None

    @classmethod
    def adopt(cls) -> Terminal | None:
        """Take over the launcher's terminal if this process is a launched rank whose
        launcher reads a terminal in the foreground; ``None`` (nothing done) otherwise."""
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
            term = cls(fd, foreground, device, shared=not orphaned(foreground))
            term._take(launcher)
            return term
        except (OSError, termios.error):
            os.close(fd)
            return None

    def _take(self, launcher: int) -> None:
        self._attributes = termios.tcgetattr(self.fd)
        self._guard = _guard(self.fd, self._attributes)
        if self.shared:
            disabled = bytes([os.fpathconf(self.fd, "PC_VDISABLE") & 0xFF])
            settings, interrupt, eof, suspend = _keys_as_line_ends(self._attributes, disabled)
            # writing and setting the terminal from the background; the launcher still reads
            self._saved[signal.SIGTTOU] = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
            _set_attributes(self.fd, settings)
            self.keys = Keys(0, interrupt, eof, suspend)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._saved[sig] = signal.signal(sig, self._on_end_signal)
        self._saved[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, signal.SIG_IGN)
        if not self.shared:
            _set_foreground(self.fd, os.getpgrp())
        atexit.register(self.release)
        for n in _STREAMS:  # the streams the launcher would forward from or to this terminal
            if n == 0 and self.shared:
                continue  # the launcher reads the keyboard
            if n == 0 or _is_terminal(f"/proc/{launcher}/fd/{n}", self.device):
                stream = (sys.stdin, sys.stdout, sys.stderr)[n]
                if n:
                    stream.flush()
                    # kept open: were they closed, the launcher would stop forwarding stdin
                    self._streams[n] = os.dup(n)
                os.dup2(self.fd, n)
                if n and hasattr(stream, "reconfigure"):
                    stream.reconfigure(line_buffering=True)

    def _on_end_signal(self, signum, frame):
        self.release()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def release(self) -> None:
        """Give the terminal back as it was: to the launcher's process group, with its
        settings (once)."""
        if not self.held:
            return
        self.held = False
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if self._attributes is not None:
            try:
                _set_attributes(self.fd, self._attributes)
            except (OSError, termios.error):
                pass  # the terminal is gone
        if not self.shared:
            try:
                _set_foreground(self.fd, self.foreground)
            except OSError:
                pass  # the launcher is gone: nothing to give back to
        if self._guard is not None and self._guard.stdin is not None:
            try:
                self._guard.stdin.write("released")
                self._guard.stdin.close()
                self._guard.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for n, original in self._streams.items():  # output goes through the launcher again
            os.dup2(original, n)
            os.close(original)
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        os.close(self.fd)

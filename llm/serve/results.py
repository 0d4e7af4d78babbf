"""The results file of ``llm generate --batch``: what may be appended to, what was finished.

A results file holds one JSON object per finished request (``id``, ``line``, ``new_ids``, ...,
see :mod:`llm.serve.batch`). Only such a file (or a new one) is ever appended to: anything else
given as ``--out`` is refused, naming the file, and left untouched. The only bytes ever removed
are a last line without its newline that begins as a result line does: a result the job was
killed while writing.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path


class BadRequest(ValueError):
    """One request line that cannot run; the message says why."""


#: What every result line holds; a file with a line without them is not a results file.
RESULT_KEYS = ("id", "line", "new_ids")
#: How every result line begins (``json.dumps({"id": ...})``): the only kind of half-written
#: last line that is cut off.
RESULT_START = b'{"id": '


def id_key(value) -> str:
    """Canonical form of a request id (so that 7 and "7" stay different)."""
    return json.dumps(value)


def check_out(out_path, requests_path=None) -> None:
    """Refuse an ``--out`` that cannot be a results file: missing, in a missing directory, a
    directory, a device, or the ``--batch`` file itself (also through a symbolic or hard
    link: the files are compared, not their names)."""
    if not out_path:
        raise BadRequest("--batch needs --out FILE (where the results go)")
    path = Path(out_path)
    try:
        kind = path.stat().st_mode
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise BadRequest(f"--out {out_path}: directory {path.parent} does not exist") from None
        return
    except OSError as e:
        raise BadRequest(f"--out {out_path}: {e.strerror or e}") from None
    if stat.S_ISDIR(kind):
        raise BadRequest(f"--out {out_path} is a directory; give the results file's name")
    if not stat.S_ISREG(kind):
        raise BadRequest(f"--out {out_path} is not a regular file; refusing to append to it")
    try:
        same = requests_path is not None and os.path.samefile(out_path, requests_path)
    except OSError:
        same = False
    if same:
        raise BadRequest(
            f"--out {out_path} is the --batch file {requests_path} (the same file under "
            "another name); choose another --out"
        )


def finished_ids(out_path, cut: bool = True) -> tuple[dict, int]:
    """Ids already in the results file, after cutting off a half-written last result line.

    Returns ``({id key: sampling settings or None}, bytes_cut)``. Raises :class:`BadRequest`
    naming the file if it is not a results file: a complete line that is not a result, or a
    last line without its newline that does not begin as a result line does (the file is then
    left as it is). ``cut=False`` only checks.
    """
    path = Path(out_path)
    if not path.exists():
        return {}, 0
    refuse = (
        f"--out {out_path}:{{}} is not a result line of this command; refusing to append to "
        "it (choose another --out)"
    )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BadRequest(f"--out {out_path}: {e.strerror or e}") from None
    keep = data.rfind(b"\n") + 1  # after the last newline: a half-written line, if a result
    done: dict = {}
    for number, raw in enumerate(data[:keep].splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or not all(k in rec for k in RESULT_KEYS):
                raise KeyError("not a result")
            done[id_key(rec["id"])] = rec.get("sampling")
        except (ValueError, KeyError, TypeError):
            raise BadRequest(refuse.format(number)) from None
    tail = data[keep:]
    if tail and not tail.startswith(RESULT_START):
        last = data[:keep].count(b"\n") + 1
        raise BadRequest(refuse.format(f"{last} (the last line, cut short)"))
    if tail and cut:
        with open(path, "r+b") as f:
            f.truncate(keep)
    return done, len(tail)


def check_sampling(done: dict, requests: list, out_path, allow: bool, log) -> None:
    """Refuse (``BadRequest``) to resume into results made with other sampling settings than
    their requests say now, unless ``allow`` (then warn)."""
    changed = [
        (r, done[id_key(r.id)])
        for r in requests
        if isinstance(done.get(id_key(r.id)), dict) and done[id_key(r.id)] != r.sampling()
    ]
    if not changed:
        return
    req, before = changed[0]
    diff = ", ".join(
        f"{k} {before.get(k)!r} there, {v!r} now"
        for k, v in req.sampling().items()
        if before.get(k) != v
    )
    message = (
        f"--out {out_path}: {len(changed)} finished result(s) were made with other sampling "
        f"settings (id {req.id!r}: {diff})"
    )
    if allow:
        log.warning(f"{message}; kept (--allow-sampling-change)")
        return
    raise BadRequest(
        f"{message}; rerun with the same settings, choose another --out, or pass "
        "--allow-sampling-change to keep them"
    )


class ResultWriter:
    """Appends one JSON line per result, flushed and fsync'ed, so a crash loses no result."""

    def __init__(self, path):
        self.f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()

"""Compare the output of a SLURM job with the same run under mpiexec.

Usage::

    python tests/slurm/same_tokens.py JOB_OUTPUT REFERENCE_OUTPUT [ID ...]

Without ids, each file must hold exactly one line, the ``generate --json`` record (so the job's
stdout is not mixed with logs). With ids, both files are ``generate --batch`` results files
(one JSON line per request, each with its ``id``) and must hold exactly those ids, once each.
Records must agree on ``prompt_ids``, ``new_ids``, ``text``, ``stopped_by`` and the meshes.
Exit 0 if they do; otherwise print the first difference and exit 1.
"""

import json
import sys

KEYS = ("prompt_ids", "new_ids", "text", "stopped_by", "decode_mesh", "prefill_mesh", "ranks")


class Mismatch(Exception):
    """The first difference found; the message says what it is."""


def records(path):
    """The JSON records of ``path``, one per non-empty line."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    out = []
    for number, line in enumerate(lines, 1):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise Mismatch(f"{path}:{number}: not JSON ({e}): {line[:120]!r}") from None
        if not isinstance(out[-1], dict) or "new_ids" not in out[-1]:
            raise Mismatch(f"{path}:{number}: not a generate record")
    return out


def by_id(path, ids):
    """``{id: record}`` of a batch results file that must hold exactly ``ids``, once each."""
    found = {}
    for rec in records(path):
        key = str(rec.get("id"))
        if key in found:
            raise Mismatch(f"{path}: id {key} appears twice")
        found[key] = rec
    if sorted(found) != sorted(ids):
        raise Mismatch(f"{path}: ids {sorted(found)}, expected {sorted(ids)}")
    return found


def compare(job, ref, what):
    for key in KEYS:
        if job.get(key) != ref.get(key):
            raise Mismatch(f"{what}{key} differs: job {job.get(key)!r}, mpiexec {ref.get(key)!r}")


def main(argv):
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    job_path, ref_path, ids = argv[1], argv[2], argv[3:]
    try:
        if ids:
            job, ref = by_id(job_path, ids), by_id(ref_path, ids)
            for key in ids:
                compare(job[key], ref[key], f"id {key}: ")
            print(
                f"{len(ids)} requests, {sum(len(r['new_ids']) for r in job.values())} tokens equal"
            )
        else:
            job, ref = records(job_path), records(ref_path)
            for path, recs in ((job_path, job), (ref_path, ref)):
                if len(recs) != 1:
                    raise Mismatch(f"{path}: {len(recs)} records, expected one JSON line")
            compare(job[0], ref[0], "")
            print(f"{len(job[0]['new_ids'])} tokens equal: {job[0]['new_ids']}")
    except Mismatch as e:
        print(e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Compare the ``generate --json`` output of a SLURM job with the same run under mpiexec.

Usage::

    python tests/slurm/same_tokens.py JOB_STDOUT REFERENCE_STDOUT

Each file must hold exactly one line, a JSON record (the job's stdout must not be mixed with
logs). The records must agree on ``prompt_ids``, ``new_ids``, ``text``, ``stopped_by`` and the
meshes. Exit 0 if they do; otherwise print the first difference and exit 1.
"""
import json
import sys

KEYS = ("prompt_ids", "new_ids", "text", "stopped_by", "decode_mesh", "prefill_mesh", "ranks")


def one_record(path):
    """The single JSON record in ``path``, or an error message (str)."""
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    if len(lines) != 1:
        return f"{path}: {len(lines)} non-empty lines, expected one JSON record"
    try:
        record = json.loads(lines[0])
    except json.JSONDecodeError as e:
        return f"{path}: not JSON ({e}): {lines[0][:120]!r}"
    if not isinstance(record, dict) or not record.get("new_ids"):
        return f"{path}: no new_ids in the record"
    return record


def main(argv):
    if len(argv) != 3:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    job, ref = one_record(argv[1]), one_record(argv[2])
    for r in (job, ref):
        if isinstance(r, str):
            print(r)
            return 1
    for key in KEYS:
        if job.get(key) != ref.get(key):
            print(f"{key} differs: job {job.get(key)!r}, mpiexec {ref.get(key)!r}")
            return 1
    print(f"{len(job['new_ids'])} tokens equal: {job['new_ids']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

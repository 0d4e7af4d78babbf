"""A batch job on the mesh with several ``--max-batch`` values, against transformers' batched
``generate``, in one session.

The job: ``--requests`` SmolLM2 requests (default 32) whose prompts are windows of 5 to 52
tokens of a fixed text, ``--new-tokens`` new tokens each (default 32), ``--ignore-eos``, greedy.

* ``mesh``: runs ``llm generate --batch`` under ``mpiexec -n RANKS`` with each ``--max-batch``
  of ``--max-batch`` in turn, ``--repeat`` rounds alternated (1, 8, 1, 8, ...), and prints each
  value's wall times, their median and its ratio to the first value's median; every run must
  give the same tokens (it stops otherwise). Needs the project venv and converted shards
  (``--shards``; ``make demo`` converts them for 2 ranks).
* ``hf``: transformers' own ``generate`` on the same prompt ids (left-padded batches of each
  ``--hf-batch``, greedy, float32 from the GGUF, ``--torch-threads`` threads), each batch size
  ``--repeat`` times; prints the wall times and how many outputs equal the mesh's (from a
  results file of ``mesh``, ``--compare``). Needs the oracle venv (``make test-oracle`` makes
  it: torch, transformers, gguf).

Example (2 ranks, then transformers)::

    .venv/bin/python tools/bench_batch.py mesh --shards out/demo-shards --max-batch 1,8
    .venv-oracle/bin/python tools/bench_batch.py hf --gguf MODEL.gguf --hf-batch 8,32 \\
        --compare out/bench-batch/results-8-0.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from meshrt.runtime import LOCAL_MPI_ENV  # noqa: E402

#: The text the prompts are cut from (any fixed text does; this one describes the project).
TEXT = (
    "A wafer-scale processor holds hundreds of thousands of small cores on one piece of "
    "silicon, each with its own memory and links to its four neighbours. A language model "
    "placed on it keeps every weight next to the core that multiplies it, so a decode step "
    "moves activations instead of weights. The vector of a token travels along the rows and "
    "columns of the mesh; partial sums meet in reduction trees whose messages only ever go "
    "from one core to the next. The cache of keys and values grows with every token and is "
    "spread over the rows, so that no core runs out of memory before the others do. When "
    "several requests decode together, each message carries one word per request, and the "
    "fixed costs of a step, the hops, the routing and the switches between tasks, are paid "
    "once for all of them. This is what a batch job wants: many prompts of different lengths, "
    "a few dozen new tokens each, and the whole job done as soon as possible."
)


def requests(tokenizer, n: int, low: int = 5, high: int = 52) -> list[dict]:
    """``n`` requests of ``prompt_ids``: windows of ``low..high`` tokens of :data:`TEXT`, the
    lengths spread evenly over the range and shuffled with a fixed seed."""
    import numpy as np

    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    lengths = [low + (i * (high - low)) // max(1, n - 1) for i in range(n)]
    rng = np.random.default_rng(0)
    rng.shuffle(lengths)
    out = []
    for i, length in enumerate(lengths):
        start = int(rng.integers(0, len(ids) - length + 1))
        out.append({"id": i, "prompt_ids": [int(t) for t in ids[start : start + length]]})
    return out


def _env() -> dict:
    return dict(os.environ, **LOCAL_MPI_ENV)


def _load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def run_mesh(args) -> int:
    from llm.text.tokenizer import load_tokenizer

    os.makedirs(args.work, exist_ok=True)
    batch_file = os.path.join(args.work, "requests.jsonl")
    reqs = requests(load_tokenizer(args.shards), args.requests)
    with open(batch_file, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in reqs)
    lengths = [len(r["prompt_ids"]) for r in reqs]
    print(
        f"{len(reqs)} requests, prompts of {min(lengths)}-{max(lengths)} tokens, "
        f"{args.new_tokens} new tokens each, {args.ranks} ranks"
    )
    sizes = [int(b) for b in args.max_batch.split(",")]
    python = args.python or sys.executable
    mpiexec = args.mpiexec or os.path.join(os.path.dirname(python), "mpiexec")
    times: dict[int, list[float]] = {b: [] for b in sizes}
    reference = None
    for rnd in range(args.repeat):
        for b in sizes:
            out = os.path.join(args.work, f"results-{b}-{rnd}.jsonl")
            if os.path.exists(out):
                os.remove(out)
            cmd = [mpiexec, "-n", str(args.ranks), python, "-m", "mpi4py", "-m", "llm"]
            cmd += ["generate", "--model", args.shards, "--batch", batch_file, "--out", out]
            cmd += ["--max-batch", str(b), "--max-new-tokens", str(args.new_tokens)]
            cmd += ["--ignore-eos", "-q"]
            load = _load_average()
            t0 = time.perf_counter()
            p = subprocess.run(
                cmd,
                env=_env(),
                capture_output=True,
                text=True,
                timeout=args.timeout,
                stdin=subprocess.DEVNULL,
            )
            wall = time.perf_counter() - t0
            if p.returncode:
                print(p.stderr, file=sys.stderr)
                return 1
            got = {}
            with open(out) as f:
                for line in f:
                    rec = json.loads(line)
                    got[rec["id"]] = rec["new_ids"]
            if reference is None:
                reference = got
            elif got != reference:
                bad = [k for k in reference if got.get(k) != reference[k]]
                print(f"--max-batch {b}: tokens differ from the first run for ids {bad}")
                return 1
            times[b].append(wall)
            print(f"round {rnd + 1}, --max-batch {b}: {wall:.1f} s (load average {load})")
    base = statistics.median(times[sizes[0]])
    for b in sizes:
        med = statistics.median(times[b])
        print(
            f"--max-batch {b}: median {med:.1f} s of {', '.join(f'{t:.1f}' for t in times[b])}"
            f" ({med / base:.2f}x --max-batch {sizes[0]})"
        )
    print("the same tokens in every run")
    if args.json:
        print(json.dumps({"times": times, "load_average_end": _load_average()}))
    return 0


def run_hf(args) -> int:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.torch_threads)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf), dtype=torch.float32
    ).eval()
    model.generation_config.eos_token_id = None
    mesh = {}
    if args.compare:
        with open(args.compare) as f:
            for line in f:
                rec = json.loads(line)
                mesh[rec["id"]] = (rec["prompt_ids"], rec["new_ids"])
        ids = sorted(mesh)
        prompts = [mesh[i][0] for i in ids]
    else:
        from llm.text.tokenizer import load_tokenizer

        reqs = requests(load_tokenizer(args.shards), args.requests)
        ids = [r["id"] for r in reqs]
        prompts = [r["prompt_ids"] for r in reqs]
    pad = 0
    for size in [int(b) for b in args.hf_batch.split(",")]:
        walls, outputs = [], {}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for s in range(0, len(prompts), size):
                chunk = prompts[s : s + size]
                width = max(len(p) for p in chunk)
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                with torch.no_grad():
                    out = model.generate(
                        input_ids=input_ids,
                        attention_mask=mask,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=pad,
                    )
                for k, row in zip(ids[s : s + size], out[:, width:].tolist()):
                    outputs[k] = row
            walls.append(time.perf_counter() - t0)
        same = sum(outputs[k] == mesh[k][1] for k in mesh) if mesh else None
        print(
            f"transformers generate, left-padded batches of {size}, {args.torch_threads} torch "
            f"threads: median {statistics.median(walls):.1f} s of "
            f"{', '.join(f'{w:.1f}' for w in walls)} (load average {_load_average()})"
            + (f"; {same} of {len(mesh)} outputs equal the mesh's" if mesh else "")
        )
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("side", choices=["mesh", "hf"])
    ap.add_argument("--shards", help="converted SmolLM2 shards (the tokenizer is read there)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--max-batch", default="1,8", help="mesh: --max-batch values, in turn")
    ap.add_argument("--work", default=os.path.join(ROOT, "out", "bench-batch"))
    ap.add_argument("--python", help="mesh: the project venv's python (default: this one)")
    ap.add_argument("--mpiexec", help="mesh: default: beside --python")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--gguf", help="hf: the SmolLM2 GGUF file (python -m llm fetch smollm2)")
    ap.add_argument("--hf-batch", default="8,32", help="hf: batch sizes")
    ap.add_argument("--torch-threads", type=int, default=2)
    ap.add_argument("--compare", help="hf: a mesh results file: same prompts, tokens compared")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    return run_mesh(args) if args.side == "mesh" else run_hf(args)


if __name__ == "__main__":
    sys.exit(main())

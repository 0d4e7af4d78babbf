"""Decode speed of the emulator against HF transformers (torch CPU, float32), in one run.

Needs the oracle venv (torch + transformers; gguf + accelerate for the real model):
``make bench-hf``. Both sides run the same weights and the same prompt ids:

* ``--model llama-100m`` (or another preset): random weights at the preset's shapes;
* ``--model smollm2``: the real SmolLM2-135M-Instruct (``python -m llm fetch smollm2``), which
  transformers reads from its GGUF file and the emulator from float32 shards converted from the
  same file (once per rank grid and mesh, kept in ``out/bench-hf/``).

Transformers runs in this process with as many torch threads as the emulator has ranks (the
cores both sides use; ``--torch-threads`` overrides); the emulator runs as ``python -m llm
bench`` under ``mpiexec``, from the project venv. Prints each side's median TTFT and time per
output token, the emulator's ratios to transformers, and the weight-stream floor: how long the
same processes take to read the float32 weights once, which no decode step can beat.
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

from llm.modeling.config import preset  # noqa: E402
from llm.storage.checkpoint import random_weights  # noqa: E402
from meshrt.runtime import LOCAL_MPI_ENV  # noqa: E402

REAL_MODELS = ("smollm2",)


def hf_model(args, config):
    """The transformers model both sides run: random preset weights or the real GGUF."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # cache argument renames
    if args.model in REAL_MODELS:
        from transformers import AutoModelForCausalLM

        path = args.gguf
        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
        model.generation_config.eos_token_id = None
        return model.eval()
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        **{
            k: v
            for k, v in config.to_hf_dict().items()
            if k not in ("architectures", "model_type", "torch_dtype", "dtype")
        }
    )
    hf.eos_token_id = None
    model = LlamaForCausalLM(hf).eval()
    state = {k: torch.from_numpy(v) for k, v in random_weights(config).items()}
    model.load_state_dict(state, strict=False)
    return model


def prompt_ids(vocab_size: int, prompt_len: int):
    """The prompt ``llm bench`` runs: ``prompt_len`` ids drawn with seed 0."""
    import numpy as np

    return np.random.default_rng(0).integers(3, vocab_size, prompt_len)


def transformers_tpot(args, config, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    model = hf_model(args, config)
    ids = torch.from_numpy(prompt_ids(config.vocab_size, args.prompt_len))[None]
    times = []
    for _ in range(args.repeat + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            ttft = time.perf_counter() - t0
            steps = []
            for _ in range(args.new_tokens - 1):
                t1 = time.perf_counter()
                out = model(tok, past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                steps.append(time.perf_counter() - t1)
        times.append((ttft, statistics.median(steps)))
    times = times[1:]
    return {
        "ttft_s": statistics.median(t for t, _ in times),
        "tpot_s": statistics.median(s for _, s in times),
        "torch_threads": torch.get_num_threads(),
    }


def _env() -> dict:
    # mpi_yield_when_idle: a rank waiting for a message yields its core instead of polling, so
    # on a machine shared with other work (more runnable processes than cores) the rank it
    # waits for gets a core; with polling every wait can last a scheduler time slice.
    # btl_sm_eager_limit: shared-memory messages up to 128 KB (every prefill message of SmolLM2
    # on 4x4; the default is 4 KB) are sent eagerly: a send completes without a rendezvous
    # round trip with its receiver, so the ranks wait for each other less (same messages).
    return dict(
        os.environ,
        **LOCAL_MPI_ENV,
        OMPI_MCA_mpi_yield_when_idle="1",
        OMPI_MCA_btl_sm_eager_limit="131072",
        OMPI_MCA_btl_sm_max_send_size="131072",
    )


def _venv_run(cmd: list, ranks: int) -> subprocess.CompletedProcess:
    py = os.path.join(ROOT, ".venv", "bin", "python")
    cmd = [py] + cmd
    if ranks > 1:
        cmd = [os.path.join(ROOT, ".venv", "bin", "mpiexec"), "-n", str(ranks)] + cmd
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return p


def real_shards(args, ranks: int) -> str:
    """Float32 shards of the real model for ``ranks`` on ``args.mesh`` (converted once)."""
    out = os.path.join(ROOT, "out", "bench-hf", f"{args.model}-{ranks}ranks-{args.mesh}")
    if not os.path.isfile(os.path.join(out, "manifest.json")):
        cmd = ["-m", "llm", "convert", args.gguf, "--out", out, "--decode-mesh", args.mesh]
        _venv_run(cmd + ["--force", "-q"], ranks)
    return out


def emulator_tpot(args, ranks: int, emulation: str) -> dict:
    source = (
        ["--model", real_shards(args, ranks)]
        if args.model in REAL_MODELS
        else ["--preset", args.model, "--decode-mesh", args.mesh, "--dtype", "float32"]
    )
    cmd = ["-m", "llm", "bench"] + source
    cmd += ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    cmd += ["--repeat", str(args.repeat), "--warmup", "1", "--emulation", emulation, "--json"]
    out = json.loads(_venv_run(cmd, ranks).stdout)
    return {
        "ttft_s": out["emulator"]["ttft_s"],
        "tpot_s": out["emulator"]["median_tpot_s"],
        "modeled_tpr": out["emulator"]["modeled_tpr"],
        "ranks": ranks,
        "emulation": emulation,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model",
        "--preset",
        default="llama-100m",
        help="a preset (random weights) or smollm2 (the real model; fetched and converted on "
        "first use); default llama-100m",
    )
    ap.add_argument("--mesh", default="8x8", help="decode virtual mesh of the emulator")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--ranks", default="2", help="emulator rank counts, comma-separated (default 2)"
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads of transformers (default: the largest rank count, at most the "
        "cores of this machine: both sides use the same cores)",
    )
    ap.add_argument(
        "--emulation",
        default=None,
        choices=["exact", "aggregated"],
        help="only this emulation mode (default: both with several ranks)",
    )
    ap.add_argument(
        "--json", action="store_true", help="also print every figure as one JSON line at the end"
    )
    args = ap.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    if args.model in REAL_MODELS:
        from llm.storage.gguf_source import GGUFFile, gguf_config

        args.gguf = _venv_run(["-m", "llm", "fetch", args.model, "-q"], 1).stdout.strip()
        args.gguf = args.gguf.splitlines()[0]
        config = gguf_config(GGUFFile(args.gguf))
    else:
        config = preset(args.model)
    print(
        f"{args.model}: {config.num_parameters() / 1e6:.1f}M parameters, "
        f"{args.prompt_len} prompt + {args.new_tokens} new tokens, median of {args.repeat}"
    )
    threads = args.torch_threads or min(max(ranks), os.cpu_count() or 1)
    hf = transformers_tpot(args, config, threads)
    print(
        f"transformers (torch CPU f32, {hf['torch_threads']} threads): "
        f"TTFT {hf['ttft_s'] * 1e3:.1f} ms, TPOT {hf['tpot_s'] * 1e3:.2f} ms "
        f"({1 / hf['tpot_s']:.1f} tok/s)"
    )
    runs = []
    for n in ranks:
        modes = (
            (args.emulation,)
            if args.emulation
            else (("exact",) if n == 1 else ("exact", "aggregated"))
        )
        for emulation in modes:
            em = emulator_tpot(args, n, emulation)
            runs.append(em)
            print(
                f"emulator ({emulation}), {n} rank(s), {args.mesh} mesh: "
                f"TTFT {em['ttft_s'] * 1e3:.1f} ms ({em['ttft_s'] / hf['ttft_s']:.2f}x), "
                f"TPOT {em['tpot_s'] * 1e3:.2f} ms ({em['tpot_s'] / hf['tpot_s']:.2f}x "
                f"transformers' time); modeled WSE-2 TPR {em['modeled_tpr']:.0f} tok/s"
            )
    floors = {n: weight_stream_floor(config, n) for n in ranks}
    for n, floor in floors.items():
        print(
            f"weight-stream floor, {n} rank(s): {floor * 1e3:.2f} ms per token "
            f"({floor / hf['tpot_s']:.2f}x transformers' time): reading the float32 weights "
            "once (tools/weight_stream.py)"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "model": args.model,
                    "mesh": args.mesh,
                    "transformers": hf,
                    "emulator": runs,
                    "weight_stream_floor_s": floors,
                }
            )
        )
    return 0


def weight_stream_floor(config, ranks: int) -> float:
    """Seconds for ``ranks`` processes to read the model's float32 weights once (their shares
    at once, as GEMVs): no decode step on these cores can be faster."""
    mib = config.num_parameters() * 4 / 2**20
    out = _venv_run(
        [os.path.join(ROOT, "tools", "weight_stream.py"), "--mib", str(mib), "--json"], ranks
    )
    return json.loads(out.stdout)["seconds"]


if __name__ == "__main__":
    sys.exit(main())

"""Decode speed of the emulator against HF transformers (torch CPU, float32), in one run.

Needs the oracle venv (torch + transformers): ``make bench-hf``. Both sides run the same random
weights at the shapes of a preset (default ``llama-100m``, ~100M parameters). Transformers runs in
this process; the emulator runs as ``python -m llm bench`` with one rank and under ``mpiexec``
with four, from the project venv. Prints each side's median time per output token and the ratios.
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


def transformers_tpot(config, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    import warnings

    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaConfig(
        **{
            k: v
            for k, v in config.to_hf_dict().items()
            if k not in ("architectures", "model_type", "torch_dtype", "dtype")
        }
    )
    hf.eos_token_id = None
    warnings.filterwarnings("ignore", category=FutureWarning)  # cache argument renames
    model = LlamaForCausalLM(hf).eval()
    state = {k: torch.from_numpy(v) for k, v in random_weights(config).items()}
    model.load_state_dict(state, strict=False)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(3, config.vocab_size, prompt_len))[None]
    times = []
    for _ in range(repeat + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            ttft = time.perf_counter() - t0
            steps = []
            for _ in range(new_tokens - 1):
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


def emulator_tpot(args, ranks: int, emulation: str = "exact") -> dict:
    py = os.path.join(ROOT, ".venv", "bin", "python")
    cmd = [
        py,
        "-m",
        "llm",
        "bench",
        "--preset",
        args.preset,
        "--decode-mesh",
        args.mesh,
        "--dtype",
        "float32",
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--repeat",
        str(args.repeat),
        "--warmup",
        "1",
        "--emulation",
        emulation,
        "--json",
    ]
    if ranks > 1:
        cmd = [os.path.join(ROOT, ".venv", "bin", "mpiexec"), "-n", str(ranks)] + cmd
    env = dict(
        os.environ,
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
        OMPI_MCA_pml="ob1",
        OMPI_MCA_btl="self,sm",
        OPENBLAS_NUM_THREADS="1",
        OMP_NUM_THREADS="1",
    )
    p = subprocess.run(
        cmd,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr}")
    out = json.loads(p.stdout)
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
    ap.add_argument("--preset", default="llama-100m")
    ap.add_argument("--mesh", default="8x8", help="decode virtual mesh of the emulator")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ranks", default="1,4", help="emulator rank counts")
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
    config = preset(args.preset)
    print(
        f"{args.preset}: {config.num_parameters() / 1e6:.1f}M parameters, "
        f"{args.prompt_len} prompt + {args.new_tokens} new tokens, median of {args.repeat}"
    )
    hf = transformers_tpot(config, args.prompt_len, args.new_tokens, args.repeat)
    print(
        f"transformers (torch CPU f32, {hf['torch_threads']} threads): "
        f"TTFT {hf['ttft_s'] * 1e3:.1f} ms, TPOT {hf['tpot_s'] * 1e3:.2f} ms "
        f"({1 / hf['tpot_s']:.1f} tok/s)"
    )
    runs = []
    for n in (int(r) for r in args.ranks.split(",")):
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
    if args.json:
        print(
            json.dumps(
                {"preset": args.preset, "mesh": args.mesh, "transformers": hf, "emulator": runs}
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

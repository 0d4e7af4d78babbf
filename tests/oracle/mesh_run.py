"""Run prompts on a shard set on the mesh and save what the oracle compares (project venv, MPI).

    mpiexec -n 4 .venv/bin/python -m mpi4py tests/oracle/mesh_run.py SHARDS PROMPTS.json OUT.npz N

``PROMPTS.json`` is a list of prompt id lists. For each prompt: the last prompt token's logits
(f32[vocab], gathered from the mesh) and ``N`` greedy tokens (no early stop). Rank 0 writes
``OUT.npz`` with ``logits`` f32[P, vocab] and ``tokens`` int64[P, N]. Used by
``tests/oracle/test_oracle_gguf.py`` (``make test-oracle``), whose venv has no MPI.

It lives in ``tests/oracle/``, not ``tests/``: a script's folder comes first on ``sys.path``, and
in ``tests/`` the test folder ``tests/llm/`` would be imported as ``llm`` in place of the package.
"""

import json
import sys

import numpy as np

from meshrt import runtime


def main(argv):
    from llm.engine.model import MeshModel

    shards, prompts_file, out, new = argv[1], argv[2], argv[3], int(argv[4])
    comm = runtime.world()
    comm = comm if comm is not None and comm.Get_size() > 1 else None
    model = MeshModel.from_shards(shards, runtime.ControlPlane.of(comm))
    prompts = json.loads(open(prompts_file).read())
    logits, tokens = [], []
    for ids in prompts:
        model.start(model.capacity_for(len(ids) + new))
        out_logits = model.prefill(ids)
        logits.append(model.logits_to_host(out_logits).reshape(-1)[: model.config.vocab_size])
        row = [model.pick(out_logits)]
        while len(row) < new:
            row.append(model.pick(model.decode(row[-1])))
        tokens.append(row)
    if comm is None or comm.Get_rank() == 0:
        np.savez(out, logits=np.array(logits, dtype=np.float32), tokens=np.array(tokens))


if __name__ == "__main__":
    sys.exit(runtime.run_main(main, sys.argv))

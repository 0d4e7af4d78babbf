"""``tools/weight_stream.py``: the weight-stream floor ``make bench-hf`` prints."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_weight_stream_reads_the_weights_once_per_pass():
    cmd = [sys.executable, str(ROOT / "tools" / "weight_stream.py"), "--mib", "8", "--repeat", "3"]
    p = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    assert rec["ranks"] == 1 and rec["mib"] == 8 and rec["seconds"] > 0
    assert abs(rec["gb_per_s"] - 8 * 2**20 / rec["seconds"] / 1e9) < 1e-9 * rec["gb_per_s"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "8 MiB of float32 weights on 1 ranks" in p.stdout

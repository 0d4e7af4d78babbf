"""Package metadata: the version is written once, in pyproject.toml."""

import re
from pathlib import Path

import meshrt

ROOT = Path(__file__).resolve().parents[1]


def test_version_comes_from_pyproject_only():
    declared = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    assert meshrt.__version__ == declared.group(1)
    literal = re.compile(rf"""["']{re.escape(declared.group(1))}["']""")
    sources = [p for d in ("meshrt", "llm") for p in (ROOT / d).rglob("*.py")]
    assert sources and not [p for p in sources if literal.search(p.read_text())]

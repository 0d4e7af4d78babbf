"""A new user's first hour: the README's quick-start commands run as written, and a first run
prints nothing the user cannot act on.

Every command of the quick start's ``bash`` blocks runs verbatim in a clean shell (``env -i``,
from a scratch directory that links to the checkout, so ``out/`` and plots land there), after
the block's ``.``/``export`` lines; :data:`SKIPPED` names the few that are not run, and why.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
#: Commands not run here (by prefix), and why.
SKIPPED = {
    "make demo ": "downloads the 93 MB SmolLM2 wheel (make demo; CI has no model cache)",
    "make test ": "the test suite itself, which this test is part of",
    "make install-plot": "installs matplotlib into the venv (a download); the --plot example is "
    "checked either way",
    "mpiexec -n 4 python -m meshrt bench gemm --mesh 64x64 --size 4096": "a 4096^3 benchmark of "
    "three algorithms: minutes on two busy cores",
    "mpiexec -n 2 python -m mpi4py -m llm bench --preset llama3-8b": "one LLaMA3-8B layer: "
    "1.6 GB per rank and minutes",
}
TIMEOUTS = {"make demo-tiny": 400}  # seconds; others DEFAULT_TIMEOUT
DEFAULT_TIMEOUT = 180
#: Files and directories of the checkout the commands use, linked into the scratch directory.
LINKED = ("Makefile", "requirements.txt", "pyproject.toml", "tests", "jobs", "llm", "meshrt")


def quickstart_blocks(readme: str) -> list[list[str]]:
    """The commands of each ``bash`` block of the Quick start section, continuation lines
    joined, comment-only lines dropped."""
    section = readme.split("\n## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = []
    for body in re.findall(r"```bash\n(.*?)```", section, re.S):
        commands = []
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
        blocks.append(commands)
    return blocks


def skip_reason(command: str) -> str | None:
    plain = re.sub(r"\s+#.*$", "", command) + " "
    for prefix, reason in SKIPPED.items():
        if plain.startswith(prefix):
            return reason
    return None


def test_the_quick_start_is_found():
    blocks = quickstart_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    commands = [c for block in blocks for c in block]
    assert "make demo-tiny" in " ".join(commands)
    assert any(c.startswith("mpiexec -n 4") for c in commands)
    assert all(skip_reason(c) is None for c in commands if c.startswith("python -m llm"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory that looks like the checkout (links), where outputs land."""
    d = tmp_path_factory.mktemp("quickstart")
    for name in LINKED:
        (d / name).symlink_to(ROOT / name)
    (d / ".venv").symlink_to(VENV)
    return d


def clean_shell(cwd: Path, script: str, timeout: float) -> subprocess.CompletedProcess:
    env = {"HOME": os.environ.get("HOME", str(cwd)), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in env.items()), "bash", "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(scratch):
    if not (VENV / "bin" / "activate").exists():
        pytest.skip("the tests do not run from the project's .venv (make install)")
    ran, skipped = [], []
    for block in quickstart_blocks((ROOT / "README.md").read_text()):
        prelude = []
        for command in block:
            if command.startswith((". ", "source ", "export ")):
                prelude.append(command)
                continue
            reason = skip_reason(command)
            if reason:
                skipped.append(f"{command}: {reason}")
                continue
            timeout = next((t for c, t in TIMEOUTS.items() if command.startswith(c)), None)
            p = clean_shell(scratch, "\n".join(prelude + [command]), timeout or DEFAULT_TIMEOUT)
            ran.append(command)
            print(f"ran: {command} (exit {p.returncode})")
            if "--plot" in command and p.returncode == 2:  # no matplotlib: say how to get it
                assert "make install-plot" in p.stderr, p.stderr
                continue
            assert p.returncode == 0, f"{command}\nexit {p.returncode}\n{p.stdout}\n{p.stderr}"
            assert "Traceback" not in p.stderr, p.stderr
            for name in re.findall(r"--plot (\S+)", command):
                assert (scratch / name).stat().st_size > 0
    assert len(ran) >= 6, ran
    print("not run:\n  " + "\n  ".join(skipped))


# ----------------------------------------------------------------------------------------------
# noise on a first run
# ----------------------------------------------------------------------------------------------


def test_license_is_an_spdx_expression():
    """``license = {text = ...}`` made setuptools print a deprecation box on every install."""
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2\.0"$', text, re.M), "license must be an SPDX string"
    assert re.search(r'requires = \["setuptools>=(\d+)"\]', text).group(1) >= "77"
    meta = importlib.metadata.metadata("waferllm-mpi")
    if meta.get("License-Expression") is None:
        pytest.skip("the installed metadata predates this pyproject.toml (make install)")
    assert meta["License-Expression"] == "Apache-2.0"


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "meshrt", "bench", "model", "--kernel", "gemv", "--plot", "p.png"],
        ["-m", "llm", "estimate", "--preset", "llama3-8b", "--plot", "p.png"],
    ],
    ids=["meshrt bench model", "llm estimate"],
)
def test_plot_without_matplotlib_names_the_install_target(argv, tmp_path):
    block = "import sys, runpy; sys.modules['matplotlib'] = None; "  # as if not installed
    module = argv[1]
    code = block + f"sys.argv = {[module] + argv[2:]!r}; runpy.run_module({module!r}, "
    code += "run_name='__main__', alter_sys=True)"
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: --plot needs matplotlib: make install-plot, or pip install 'waferllm-mpi[plot]'"
    ]
    assert not (tmp_path / "p.png").exists()


def test_plots_are_drawn_with_matplotlib(tmp_path):
    pytest.importorskip("matplotlib", reason="make install-plot installs it")
    for argv in (
        ["-m", "meshrt", "bench", "model", "--kernel", "gemv", "--plot", "a.png"],
        ["-m", "llm", "estimate", "--preset", "llama3-8b", "--plot", "b.png"],
    ):
        p = subprocess.run(
            [sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert p.returncode == 0, p.stderr
    assert (tmp_path / "a.png").stat().st_size > 0 and (tmp_path / "b.png").stat().st_size > 0


def test_fetch_quiet_prints_only_the_path(monkeypatch, capsys):
    """``llm fetch smollm2 -q`` (the Makefile's way to find the file) printed the log too."""
    import argparse

    import llm.storage.fetch as fetch_module
    from llm.cli import fetch as fetch_cli
    from meshrt.runtime import ControlPlane

    def cached(name, cache, wheel, log):
        log.info(f"{name}: already fetched and checked")
        return Path("/cache/smollm2.gguf")

    monkeypatch.setattr(fetch_module, "fetch", cached)
    args = argparse.Namespace(name="smollm2", cache_dir=None, wheel=None, quiet=True)
    assert fetch_cli.run(args, ControlPlane.single()) == 0
    out = capsys.readouterr()
    assert out.out == "/cache/smollm2.gguf\n" and out.err == ""
    args.quiet = False
    fetch_cli.run(args, ControlPlane.single())
    assert "already fetched" in capsys.readouterr().err


def test_sbatch_output_files_are_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    sbatch = (ROOT / "jobs" / "slurm.sbatch").read_text()
    assert "#SBATCH --output=%x-%j.out" in sbatch  # written where sbatch is run: the root
    p = subprocess.run(
        ["git", "check-ignore", "waferllm-1234.out", "waferllm-1234.err"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    ignored = p.stdout.split()
    assert ignored == ["waferllm-1234.out", "waferllm-1234.err"], "sbatch output is not ignored"


@pytest.mark.slow
def test_plmr_warning_once_on_rank_0_with_what_to_do():
    """bench used to print each PLMR violation on every rank, generate on every run."""
    from faultcase import run

    p, _ = run(
        ["bench", "--preset", "llama-100m", "--layers", "1", "--decode-mesh", "2x2"]
        + ["--new-tokens", "2", "--repeat", "1", "--warmup", "0"],
        n=2,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    warnings = [line for line in p.stderr.splitlines() if "PLMR" in line]
    assert len(warnings) == 1, p.stderr
    assert warnings[0].startswith("[0/2] PLMR: memory") and "llm plan" in warnings[0]

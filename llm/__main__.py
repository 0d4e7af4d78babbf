"""``python -m llm``: see :mod:`llm.cli` (the parsers and the command bodies)."""

import sys

from llm.cli import build_parser, main  # noqa: F401  (build_parser: for tests and docs)

if __name__ == "__main__":
    sys.exit(main())

"""``python -m meshrt``: see :mod:`meshrt.cli` (the parsers and the command bodies)."""

import sys

from meshrt.cli import main

if __name__ == "__main__":
    sys.exit(main())

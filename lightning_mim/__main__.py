"""``python -m lightning_mim``: see :mod:`lightning_mim.cli`."""

import sys

from lightning_mim.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python -m secagg``: the ``secagg`` command (for an environment whose scripts directory is
not on PATH)."""

import sys

from secagg.cli import main

if __name__ == "__main__":
    sys.exit(main())

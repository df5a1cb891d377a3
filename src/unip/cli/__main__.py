"""``python -m unip.cli``: the ``unip`` command (what ``torchrun -m unip.cli`` and the sweep's cells run)."""

import sys

from unip.cli import main

if __name__ == "__main__":
    sys.exit(main())

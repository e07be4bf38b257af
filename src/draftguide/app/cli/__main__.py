"""`python -m draftguide.app.cli ...`: the `draftguide` command (torchrun launches it this way)."""

import sys

from draftguide.app.cli import main

if __name__ == "__main__":
    sys.exit(main())

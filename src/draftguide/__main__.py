"""`python -m draftguide ...` == the `draftguide` command."""

import sys

from .cli import main

sys.exit(main())

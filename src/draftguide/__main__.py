"""`python -m draftguide ...` == the `draftguide` command."""

import sys

from draftguide.app.cli import main

sys.exit(main())

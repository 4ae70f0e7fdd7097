"""``python -m localvault``: serve a vault until Ctrl-C or SIGTERM."""

import sys

from .cli import main

sys.exit(main())

"""`python -m sd` is the `sd` command."""

import sys

from .cli import main

sys.exit(main())

"""`python -m metafusion` is the `metafusion` command."""

import sys

from .cli import main

sys.exit(main())

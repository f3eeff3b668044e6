"""``python -m rge``: the ``rge`` command."""

import sys

from .cli import main

sys.exit(main())

"""``python -m rge.cli``: the ``rge`` command."""

import sys

from . import main

sys.exit(main())

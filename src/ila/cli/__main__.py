"""``python -m ila.cli``: the same as the ``ila`` command."""

import sys

from . import main

sys.exit(main())

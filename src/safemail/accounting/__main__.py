"""``python -m safemail.accounting``: see :mod:`safemail.accounting.cli`."""

import sys

from safemail.accounting.cli import main

sys.exit(main())

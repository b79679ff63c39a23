"""``python -m kvpolicy compare ...``: the same as the ``kvpolicy`` console script."""

import sys

from .cli import main

sys.exit(main())

"""``python -m sidegate_operator`` is ``sidegate``."""

import sys

from .cli import main

sys.exit(main())

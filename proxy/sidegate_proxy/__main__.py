"""``python -m sidegate_proxy`` runs the data-plane commands without the operator installed."""

import sys

from .cli import main

sys.exit(main())
